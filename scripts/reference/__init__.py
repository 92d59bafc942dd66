"""Plain reference implementations that the tests and the benchmarks compare the product against."""
