"""Teacher stage: chain-of-thought traces from a reasoning model, offline (vLLM) or over an OpenAI-compatible API.

`teacher.generate.run` is the `distill generate` stage (crash-safe, shardable); `teacher.generate.generate_traces`
is the plain "problems in, traces out" call that evaluation reuses. Backends: `teacher.offline` (`vllm.LLM`),
`teacher.endpoint` (`openai.AsyncOpenAI`).
"""
