"""Raw tensor frames for pooled outputs on the engine core -> frontend socket (DESIGN.md §2).

A message is `[type][msgpack payload][frame 0][frame 1]...`: each pooled output's bytes leave
its `PooledTensor` (which keeps dtype, shape and the frame's index) and go as a frame of their
own, so ZeroMQ sends them without a copy and msgpack never sees them. `split_tensor_frames` is
called by the engine core's output thread, `attach_tensor_frames` by the frontend's client.
"""

from __future__ import annotations

import msgspec

from ember.enginecore.messages import EngineCoreOutputs


def split_tensor_frames(outputs: EngineCoreOutputs) -> tuple[EngineCoreOutputs, list[bytes]]:
    """Move the bytes of every pooled output into a list of frames; the payload keeps indices."""
    frames: list[bytes] = []
    moved = []
    for output in outputs.outputs:
        tensor = output.pooling_output
        if tensor is not None and tensor.frame < 0:
            frames.append(tensor.data)
            tensor = msgspec.structs.replace(tensor, data=b"", frame=len(frames) - 1)
            output = msgspec.structs.replace(output, pooling_output=tensor)
        moved.append(output)
    if not frames:
        return outputs, frames
    return msgspec.structs.replace(outputs, outputs=moved), frames


def attach_tensor_frames(outputs: EngineCoreOutputs, frames: list) -> dict[str, memoryview]:
    """The raw bytes of each pooled output, by request id, from the frames after the payload
    (zmq frames or bytes). A frame index out of range raises ValueError."""
    buffers = {}
    for output in outputs.outputs:
        tensor = output.pooling_output
        if tensor is None:
            continue
        if not 0 <= tensor.frame < len(frames):
            raise ValueError(f"pooled output of {output.request_id!r} names a missing frame")
        frame = frames[tensor.frame]
        buffers[output.request_id] = memoryview(getattr(frame, "buffer", frame))
    return buffers
