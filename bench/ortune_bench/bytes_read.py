"""Bytes a decode step reads per token (weights, counted from the model itself, plus the KV cache so
far), and the floor they set: a step cannot be faster than reading them at the copy bandwidth."""

from __future__ import annotations

from pathlib import Path

from ortune_bench import NEW_TOKENS


def floor_ms(bytes_per_token: float, bandwidth: float) -> float:
    return 1000.0 * bytes_per_token / bandwidth


# (op type, input index) of tables read one row per token: the token's embedding, its rotary angles.
ROW_READS = {
    ("Gather", 0),
    ("GatherBlockQuantized", 0),
    ("GatherBlockQuantized", 2),
    ("GatherBlockQuantized", 3),
    ("GroupQueryAttention", 7),
    ("GroupQueryAttention", 8),
}


def onnx_weight_bytes(model_path: Path) -> dict:
    """Bytes of the ONNX initializers a decode step reads: all in full, except those only row-gathered
    (one row each). Shapes come from the graph; external weight data is never loaded."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(model_path), load_external_data=False).graph
    users: dict[str, set] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            users.setdefault(name, set()).add((node.op_type, index))
    full = rows = stored = 0
    for tensor in graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        bits = (
            4
            if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
            else 8 * tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        )
        nbytes = count * bits // 8
        stored += nbytes
        if users.get(tensor.name) and users[tensor.name] <= ROW_READS and tensor.dims:
            rows += nbytes // tensor.dims[0]
        else:
            full += nbytes
    return {"stored": stored, "read_in_full": full, "rows_gathered": rows, "per_token": full + rows}


def torch_weight_bytes(model) -> dict:
    """As onnx_weight_bytes, for a transformers model: the input embedding is gathered (one row), unless
    it is tied to the output projection, which reads all of it (SmolLM2)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    full = rows = stored = 0
    for parameter in model.parameters():  # a tied matrix is listed once
        nbytes = parameter.numel() * parameter.element_size()
        stored += nbytes
        if parameter is embedding and not tied:
            rows += nbytes // parameter.shape[0]
        else:
            full += nbytes
    return {"stored": stored, "read_in_full": full, "rows_gathered": rows, "per_token": full + rows}


def kv_bytes_per_token(
    layers: int, kv_heads: int, head_size: int, dtype_bytes: int, prompt_tokens: int, new_tokens: int = NEW_TOKENS
) -> float:
    """Mean KV cache bytes read by one decode step over the timed steps (keys and values of every
    earlier position, every layer). Step i (1..new_tokens-1) attends over prompt_tokens + i positions."""
    mean_positions = prompt_tokens + new_tokens / 2
    return 2 * layers * kv_heads * head_size * dtype_bytes * mean_positions
