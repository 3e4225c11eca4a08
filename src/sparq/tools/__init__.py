"""Tools built on the attention core: the `sparq` command (cli), timed generation and the passkey
demo (generation), benchmarks (bench_kernels: `sparq bench kernels`; bench_generate: `sparq bench
generate`) and the evaluation (eval: `sparq eval`). Nothing in the core imports from here."""
