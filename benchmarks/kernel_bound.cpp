// The W route of an MPO layer as two C++ functions over torch's own kernels (ATen): no Python and one
// autograd node per call. Compiled by benchmarks/kernel_bound.py (torch.utils.cpp_extension) to measure how
// much of the layer's gap to nn.Linear is interpreter and autograd overhead; not part of the library.
//
// Cores are (r_left, i, j, r_right). A half of the chain, cores [a, b), is built as a matrix with rows
// (r_a, I, J) and columns r_b; W = (left @ right) with its (IL, JL, IR, JR) axes put in (IL, IR, JL, JR) order.
#include <torch/extension.h>

#include <vector>

using at::Tensor;

namespace {

// The products of the cores [a, b) one by one; each is (r_a * I_k * J_k, r_k), rows (r_a, I_k, J_k).
std::vector<Tensor> chain(const std::vector<Tensor>& cores, size_t a, size_t b) {
  const Tensor& first = cores[a];
  int64_t rows = first.size(0) * first.size(1), cols = first.size(2);  // (r_a * I, J)
  std::vector<Tensor> products{first.reshape({rows * cols, first.size(3)})};
  for (size_t k = a + 1; k < b; ++k) {
    const Tensor& core = cores[k];
    int64_t r = core.size(0), i = core.size(1), j = core.size(2), r2 = core.size(3);
    Tensor next = at::mm(products.back(), core.reshape({r, i * j * r2}));
    products.push_back(next.view({rows, cols, i, j, r2}).transpose(1, 2).reshape({rows * i * cols * j, r2}));
    rows *= i;
    cols *= j;
  }
  return products;
}

// The cores' gradients of the half [a, b) from the gradient of its last product.
void chain_backward(const std::vector<Tensor>& cores, size_t a, size_t b, Tensor grad,
                    const std::vector<Tensor>& products, std::vector<Tensor>& grads) {
  std::vector<int64_t> rows{cores[a].size(0) * cores[a].size(1)}, cols{cores[a].size(2)};
  for (size_t k = a + 1; k < b; ++k) {
    rows.push_back(rows.back() * cores[k].size(1));
    cols.push_back(cols.back() * cores[k].size(2));
  }
  for (size_t k = b - 1; k > a; --k) {
    const Tensor& core = cores[k];
    int64_t r = core.size(0), i = core.size(1), j = core.size(2), r2 = core.size(3);
    int64_t m = rows[k - 1 - a], n = cols[k - 1 - a];
    Tensor g = grad.reshape({m, i, n, j, r2}).transpose(1, 2).reshape({m * n, i * j * r2});
    grads[k] = at::mm(products[k - 1 - a].t(), g).view({r, i, j, r2});
    grad = at::mm(g, core.reshape({r, i * j * r2}).t());
  }
  grads[a] = grad.reshape(cores[a].sizes());
}

struct Sizes {
  int64_t in_left = 1, out_left = 1, in_right = 1, out_right = 1;
};

Sizes sizes_of(const std::vector<Tensor>& cores, size_t split) {
  Sizes s;
  for (size_t k = 0; k < cores.size(); ++k) {
    (k < split ? s.in_left : s.in_right) *= cores[k].size(1);
    (k < split ? s.out_left : s.out_right) *= cores[k].size(2);
  }
  return s;
}

}  // namespace

// y = x @ W + bias, and W and its halves for the backward: {y, W, left, right}.
std::vector<Tensor> forward(const Tensor& x, const c10::optional<Tensor>& bias, const std::vector<Tensor>& cores,
                            int64_t split) {
  Sizes s = sizes_of(cores, split);
  Tensor left = chain(cores, 0, split).back();                                    // (IL * JL, r)
  Tensor right = chain(cores, split, cores.size()).back().view({cores[split].size(0), -1});  // (r, IR * JR)
  Tensor weight = at::mm(left, right)
                      .view({s.in_left, s.out_left, s.in_right, s.out_right})
                      .transpose(1, 2)
                      .reshape({s.in_left * s.in_right, s.out_left * s.out_right});
  Tensor y = bias.has_value() ? at::addmm(*bias, x, weight) : at::mm(x, weight);
  return {y, weight, left, right};
}

// {x's gradient, the bias's, the cores'...}; undefined tensors where none was asked for.
std::vector<Tensor> backward(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& left,
                             const Tensor& right, const std::vector<Tensor>& cores, int64_t split, bool need_x,
                             bool need_bias) {
  Sizes s = sizes_of(cores, split);
  std::vector<Tensor> out{need_x ? at::mm(grad, weight.t()) : Tensor(), need_bias ? grad.sum(0) : Tensor()};
  Tensor grad_weight = at::mm(x.t(), grad)
                           .view({s.in_left, s.in_right, s.out_left, s.out_right})
                           .transpose(1, 2)
                           .reshape({s.in_left * s.out_left, s.in_right * s.out_right});
  std::vector<Tensor> grads(cores.size());
  chain_backward(cores, 0, split, at::mm(grad_weight, right.t()), chain(cores, 0, split), grads);
  chain_backward(cores, split, cores.size(), at::mm(left.t(), grad_weight).reshape({-1, cores.back().size(3)}),
                 chain(cores, split, cores.size()), grads);
  out.insert(out.end(), grads.begin(), grads.end());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "y = x @ W + bias, with W and its halves");
  m.def("backward", &backward, "the gradients of x, the bias and the cores");
}
