"""The tools the CLI runs: ``tamma-events bench`` (`tamma_events.tools.bench`,
`tamma_events.tools.bench_full` and the peer stores of `tamma_events.tools.bench_peers`),
``tamma-events torture`` (`tamma_events.tools.torture`) and the demo workload
(`tamma_events.tools.workload`). ``import tamma_events`` does not import them."""
