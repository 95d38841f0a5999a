"""Part "optim": optimizers, built on one multi-tensor kernel (refimpl.optim.multi_tensor)."""
