"""Evaluation library behind the `evaluate`, `rollout`, `speed`, `score` and `make_report` CLIs:
`batch_sampling` (n completions per prompt with the inference engine), `grading` (rule grading of math and
multiple-choice answers, dispatching code rows to `code_grading`, the sandboxed test runner), `eval_metrics`
(pass@k, avg@k, length and budget accounting -> report rows), `report` (rows -> report.md / report.json /
plots) and `score_pipo` (`score --pipo`: per-token log-probs and confidence in compressed mode). Nothing is
imported here; import the modules (`from pipo_jax.evaluation import grading`)."""
