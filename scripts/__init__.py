"""Development scripts (``make demo``, ``make reference``, the GPU benchmark); a package so that tests import them."""
