"""The benchmark: the server over HTTP against the machine's own limits for the same model.

    python -m keras_serve.tools.benchmark --help

cli.py runs the steps; limits.py measures the raw forward pass, the in-process pipeline and
the engines; load.py starts the server and generates the HTTP load; inputs.py makes what is
sent; procstats.py reads CPU and memory from /proc; stats.py and report.py turn numbers
into the report. The product never imports this package.
"""
