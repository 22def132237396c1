"""Python clients of the Strata services, one module per service (`registry.py`: RegistryClient).

They sit outside every service's package so that any service, the CLI, the demo, tests and
benchmarks can use them without importing another service: a client depends only on the
generated stubs and services/common/client.py (channel, TLS, token).
"""
