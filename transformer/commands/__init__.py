"""The command-line tools (`transformer-evaluate`, `-translate`, `-average`, `-attention`, `-export`, `-generate`,
`-serve`).

`transformer-prepare` and `transformer-train` live with the code they run (`transformer.data.prepare`,
`transformer.train`), which Python callers use as well.
"""
