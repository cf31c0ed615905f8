"""Reference helpers shared by the tests and the benchmarks (never a test module's private
names)."""
