"""Triton kernels, one per file; each module has the kernel, its autograd.Function, a plain-torch
reference, and a public function that picks between them (``dispatch.use_triton``)."""
