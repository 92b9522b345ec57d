// The ADInplaceOrView kernel of a custom op that writes one of its tensor arguments in place
// (scale_rows_'s grad, integrate_step's acc), for every device: the backend kernel runs below
// this key, then the written tensor's version is bumped, as PyTorch's own in-place ops bump it
// (a custom op's write below autograd does not), so that autograd raises for a tensor saved
// before the write instead of using its new values.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <utility>

namespace fastbound {

template <typename Sig, typename... Args>
void redispatch_and_bump(const c10::TypedOperatorHandle<Sig>& op, c10::DispatchKeySet keys, const at::Tensor& written,
                         Args&&... args) {
  {
    const c10::impl::ExcludeDispatchKeyGuard below(c10::DispatchKey::ADInplaceOrView);
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, std::forward<Args>(args)...);
  }
  written.unsafeGetTensorImpl()->bump_version();
}

}  // namespace fastbound
