"""Starts PyPI's gcp-storage-emulator with the two pieces of the GCS JSON API that tensorstore
(Orbax's array writer) relies on and the emulator lacks (2026.7.19):

* media downloads carry the object's generation in ``x-goog-generation``;
* ``ifGenerationMatch`` / ``ifGenerationNotMatch`` on downloads answer 412 / 304.

Without them tensorstore's OCDBT manifest update fails with "Malformed StorageGeneration" on the
second checkpoint. Everything else is the emulator's own. Usage: python gcs_emulator.py PORT BUCKET
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001 - missing objects: the emulator's own 404
    return _download(request, response, storage, *args, **kwargs)
  generation = str(obj["generation"])
  match = request.query.get("ifGenerationMatch", [None])[0]
  not_match = request.query.get("ifGenerationNotMatch", [None])[0]
  response["x-goog-generation"] = generation
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  if match is not None and match != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  if not_match is not None and not_match == generation:
    response.status = HTTPStatus.NOT_MODIFIED
    return None
  return _download(request, response, storage, *args, **kwargs)


objects.download = download  # objects.get (alt=media) and the router look it up at call time

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main  # noqa: E402
  port, bucket = sys.argv[1:3]
  main(["start", "--host=127.0.0.1", f"--port={port}", f"--default-bucket={bucket}", "--in-memory", "--quiet"])
