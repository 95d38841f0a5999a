"""Part "attention": what attention computes, and how to compute it faster or differently."""
