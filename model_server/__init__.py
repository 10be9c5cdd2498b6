"""A small, faithful stand-in for TensorFlow Serving's gRPC API.

TF Serving's binary and Docker image cannot be installed on these machines, so
this package serves the part of its API that carrecog's router uses, over the
same `serving_models/` tree and `models.config`, running the same SavedModels
with TensorFlow; the router cannot tell it from `tensorflow/serving`:

- tensorflow.serving.PredictionService/Predict and /GetModelMetadata
  (metadata_field "signature_def": the SignatureDefMap packed in an Any);
- tensorflow.serving.ModelService/GetModelStatus;
- grpc.health.v1 (SERVING once every configured model version has loaded;
  TF Serving itself has no gRPC health service) and optional reflection.

Faithful to TF Serving: version folders and policies (latest N, all,
specific), version labels, ModelSpec resolution, validation order, status
codes and messages (copied from TF Serving's sources), typed output fields.

Not implemented: Classify, Regress, MultiInference and
HandleReloadConfigRequest (UNIMPLEMENTED); the REST API (--rest_api_port is
accepted and ignored); polling for new versions or config changes (restart to
pick them up); padding of variable-length inputs when batching; run timeouts
from the call deadline; warm-up requests from assets.extra.

Server-side batching (--enable_batching, --batching_parameters_file) follows
TF Serving's BatchingSession: see model_server.batch_scheduler.

Modules: config (models.config, version folders), batching (batching
parameters), batch_scheduler (merging calls into batches), repository (loaded
servables, lookups), predict (the three calls on protos), errors (typed
errors, status mapping), servicer (gRPC).
"""
