"""Python client and `avsr` command line for the avsr-pipeline service.

    from avsr_client import Client
    client = Client("http://127.0.0.1:8000", api_key="local-dev-key")
    result = client.transcribe_file("clip.mp4")          # upload, submit, wait, fetch
    print(result["text"], [s["start"] for s in result["segments"]])

The remote client needs only the base install (requests); `avsr transcribe` (local mode) needs the
`cpu` and `gpu` extras as well.
"""

from avsr_client.client import AvsrError, Client, JobFailed, verify_webhook

__all__ = ["AvsrError", "Client", "JobFailed", "verify_webhook"]
