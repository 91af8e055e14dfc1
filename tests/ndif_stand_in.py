"""A stand-in for NDIF: nnsight's remote path run in this process against a second model that holds the weights.

nnsight's own ``remote="local"`` (``LocalSimulationBackend``) serializes a trace as for NDIF and deserializes it
with the user's modules hidden, but then runs it on the client's own model, which for ``load_model(name,
backend="ndif")`` is a meta-device model without weights. Here the deserialized trace runs against a "server"
model instead (resolved, as on NDIF, through nnsight's persistent ids), and only the values the trace saved come
back into the caller's frame, as from NDIF. NDIF itself cannot be reached from here.
"""

from __future__ import annotations

import linecache


def server_stand_in(weights_dir, tokenizer):
    """A backend for a remote trace whose server is an nnsight model of the weights in ``weights_dir``."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.modeling.transformers import TransformersModel
    from nnsight.ndif import pull_env
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import _saves, save
    from nnsight.tracing.util import push
    from transformers import AutoModelForCausalLM

    server = TransformersModel(AutoModelForCausalLM.from_pretrained(weights_dir).eval(), tokenizer=tokenizer,
                               task="text-generation")

    class ServerStandIn(LocalSimulationBackend):
        def __call__(self, tracer) -> None:
            pull_env()
            blob = RequestModel.serialize(tracer)
            filename = tracer.info.frame.f_code.co_filename
            kept = linecache.cache.get(filename)  # deserialize registers the block's source under this name
            hidden = self._hide_local_modules()  # the server has no mechbook
            try:
                restored = RequestModel.deserialize(blob, server._remoteable_persistent_objects())
            finally:
                self._restore(hidden)
                if kept is None:
                    linecache.cache.pop(filename, None)
                else:
                    linecache.cache[filename] = kept
            restored.execute(restored.info.code)
            result = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in _saves()}
            for value in result.values():
                save(value)
            push(tracer.info.frame, result)

    return ServerStandIn(server)


def serve_from(model, weights_dir) -> None:
    """Send every remote trace of ``model`` (loaded with backend="ndif") to a stand-in server of ``weights_dir``."""
    stand_in = server_stand_in(weights_dir, model.tokenizer)
    model.runner.lm._remote_backend = lambda remote, *args: stand_in
