"""`make demo`: the whole distillation offline on a laptop, with an ablation that shows it works.

`task` (the synthetic problems and gold reasoning), `prepare` + `teacher` (problems and tiny models where
`recipes/demo.yaml` reads them), `ablation` (comparison runs through the pipeline's own stages), `report`
(`runs/<name>/report.md`), `command` (`distill demo ...`).
"""
