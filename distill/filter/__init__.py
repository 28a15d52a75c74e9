"""Filter: verify, clean, deduplicate and decontaminate teacher traces. The stage is `distill.filter.stage`; the
standalone verifier `distill verify` is `distill.filter.standalone`."""
