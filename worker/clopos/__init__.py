"""The Clopos Open API v2, as the worker uses it.

    wire      one httpx.Client and the base URL; every response classified into success or
              a typed error of worker.errors (`classify`, pure)
    auth      POST /v2/auth for one brand: its credentials in, a Token out
    tokens    one token per brand, shared by every worker process through Redis
    client    GET and PATCH a receipt with the brand's shared token, under a call gate

Built in this order, each handed to the next (worker/runtime.py):
`Wire -> AuthCaller -> TokenProvider -> CloposClient`. Nothing here imports the pipeline.
"""
