"""EP-context models: the provider's compiled form of a model, saved as ONNX Runtime's
"EP context" model (one EPContext node holding the provider's binary), which apps load without
compiling the graph on the device (QNN: a context binary for the HTP; session load 0.1-0.4 s
instead of 1.5-2.2 s for MiniLM, issue 13).

An execution that can write one declares the session settings (`Execution.context_settings`:
ep.context_enable, ep.context_embed_mode); ONNX Runtime writes the file named by
ep.context_file_path while it creates a session on the compiled QDQ model. The written model
gets the QDQ model's metadata (target, provider, device), so eval and bench run it where it was
compiled for.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from edgeq.runtime.execution import Execution
from edgeq.runtime.providers import ProviderError
from edgeq.runtime.sessions import make_session


def write_ep_context(model_path: str | os.PathLike, execution: Execution, output: str | os.PathLike, *,
                     embed: bool = True, threads: int = 0) -> Path:
    """Compile `model_path` on `execution`'s provider and write its EP-context model to `output`
    (embed: the binary inside the ONNX file; else beside it, `<output stem>_<provider>.bin`)."""
    if not execution.context_settings:
        raise ProviderError(f"the {execution.name} execution provider writes no precompiled (EP context) model",
                            fix="drop --ep-context")
    output = Path(output)
    if output.resolve() == Path(model_path).resolve():
        raise ProviderError("the EP-context model would overwrite the compiled model", fix="choose another path")
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        output.unlink()  # ONNX Runtime refuses to overwrite an existing context model
    settings = dict(execution.context_settings)
    settings["ep.context_embed_mode"] = "1" if embed else "0"
    settings["ep.context_file_path"] = str(output)
    make_session(str(model_path), threads, execution=execution, config=list(settings.items()))
    if not output.exists():
        raise ProviderError(f"{execution.provider} wrote no EP-context model to {output}",
                            fix="check that the provider supports EP context models")
    _copy_metadata(Path(model_path), output)
    return output


def is_ep_context(model: onnx.ModelProto) -> bool:
    """Whether `model` is an EP-context model (its graph holds EPContext nodes)."""
    return any(node.op_type == "EPContext" for node in model.graph.node)


def _copy_metadata(source: Path, context_model: Path) -> None:
    """The compiled model's metadata (target, provider, device, provenance) on the context model."""
    metadata = onnx.load(str(source), load_external_data=False).metadata_props
    model = onnx.load(str(context_model))
    present = {p.key for p in model.metadata_props}
    for prop in metadata:
        if prop.key not in present:
            model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(model, str(context_model))
