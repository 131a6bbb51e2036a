"""Export of compiled programs and packed weights for warm starts (`ktjax export`,
`LLM(model, artifacts=DIR)`), and the program sets that precompile covers."""
