"""The kernel signature that `mx.fast.metal_kernel` generates, in two dialects.

`metal_source` reproduces, character for character, the source MLX 0.32
builds around a kernel body (``write_signature``, ``write_template`` and the
kernel-name rules in mlx/backend/common/metal_kernel.cpp of MLX v0.32.1).
`harness_source` builds the same function for the C++ emulator: the same
name, template parameters, parameter names and order, with bounds-checked
``mtl::buffer`` objects in place of ``device``/``constant`` pointers and plain
parameters in place of ``[[attribute]]`` ones.

Both take the launch description that the Python wrappers hand to MLX, so a
test can compare `metal_source` with MLX's own output (MLX prints it with
``verbose=True``) and then run `harness_source` on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

# Inputs with fewer elements than this are passed in the constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8

# Every thread attribute that MLX declares when its name occurs in the body,
# in MLX's order, with its Metal type.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

_TYPE_STRINGS = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float64: "double",
    mx.complex64: "complex64_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}


def type_string(dtype: mx.Dtype) -> str:
    """Return the Metal type name MLX uses for ``dtype``."""
    return _TYPE_STRINGS[dtype]


@dataclass(frozen=True)
class Parameter:
    """One kernel parameter, in MLX's buffer order.

    ``kind`` is ``input``, ``shape``, ``strides``, ``ndim``, ``output`` or
    ``attribute``; ``buffer`` is the Metal buffer index (None for attributes).
    ``input_index`` is the input the parameter belongs to (None for outputs and
    attributes); ``scalar`` marks a 0-d input passed by reference.
    """

    kind: str
    name: str
    type: str
    buffer: int | None
    location: str = "device"
    input_index: int | None = None
    scalar: bool = False


def _template_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return type_string(value)


def template_definition(template) -> str:
    """Return MLX's template argument list, e.g. ``<float, 64, 1>``."""
    return "<" + ", ".join(_template_value(value) for _, value in template) + ">"


def _template_hash(definition: str) -> str:
    # MLX v0.32.1 maps "<", ">" and ", " to "_". The MLX 0.32.4 wheel also
    # maps the "-" of negative values, which
    # test_signature_matches_mlx_synthetic checks against the installed MLX.
    text = []
    i = 0
    while i < len(definition):
        c = definition[i]
        if c in "<>-":
            text.append("_")
        elif c == "," and i + 1 < len(definition) and definition[i + 1] == " ":
            text.append("_")
            i += 1
        else:
            text.append(c)
        i += 1
    return "".join(text)[:-1]


def kernel_name(launch) -> str:
    """Return the name MLX gives the instantiated kernel of ``launch``."""
    name = "custom_kernel_" + launch.name
    if launch.template:
        name += "_" + _template_hash(template_definition(launch.template))
    for array in launch.inputs:
        name += "_" + type_string(array.dtype)
        if array.ndim == 0:
            name += "s"
        elif array.size < MAX_CONSTANT_ARRAY_SIZE:
            name += "c"
    for dtype in launch.output_dtypes:
        name += "_" + type_string(dtype)
    return name


def attributes_used(source: str) -> list[tuple[str, str]]:
    """Return the thread attributes MLX declares for ``source`` (substring match, as MLX does)."""
    return [(name, kind) for name, kind in METAL_ATTRIBUTES if name in source]


def parameters(launch) -> list[Parameter]:
    """Return the parameters of the generated kernel, in MLX's order."""
    params = []
    index = 0
    for i, (name, array) in enumerate(zip(launch.input_names, launch.inputs)):
        location = "constant" if array.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        params.append(
            Parameter("input", name, type_string(array.dtype), index, location, i, scalar=array.ndim == 0)
        )
        index += 1
        if array.ndim == 0:
            continue
        for kind, type_name in (("shape", "int"), ("strides", "int64_t"), ("ndim", "int")):
            if f"{name}_{kind}" in launch.source:
                params.append(Parameter(kind, f"{name}_{kind}", type_name, index, "constant", i))
                index += 1
    for name, dtype in zip(launch.output_names, launch.output_dtypes):
        params.append(Parameter("output", name, type_string(dtype), index))
        index += 1
    for name, kind in attributes_used(launch.source):
        params.append(Parameter("attribute", name, kind, None))
    return params


def metal_source(launch, atomic_outputs: bool = False) -> str:
    """Return the full Metal source MLX generates for ``launch``."""
    name = kernel_name(launch)
    text = launch.header
    if launch.template:
        kinds = []
        for param_name, value in launch.template:
            if isinstance(value, bool):
                kinds.append(f"bool {param_name}")
            elif isinstance(value, int):
                kinds.append(f"int {param_name}")
            else:
                kinds.append(f"typename {param_name}")
        text += "template <" + ", ".join(kinds) + ">\n"
    text += f"[[kernel]] void {name}(\n"

    params = parameters(launch)
    attributes = [p for p in params if p.kind == "attribute"]
    for p in params:
        if p.kind == "input":
            ref = "&" if p.scalar else "*"
            text += f"  const {p.location} {p.type}{ref} {p.name} [[buffer({p.buffer})]],\n"
        elif p.kind in ("shape", "strides"):
            text += f"  const constant {p.type}* {p.name} [[buffer({p.buffer})]],\n"
        elif p.kind == "ndim":
            text += f"  const constant int& {p.name} [[buffer({p.buffer})]],\n"
        elif p.kind == "output":
            element = f"atomic<{p.type}>" if atomic_outputs else p.type
            text += f"  device {element}* {p.name} [[buffer({p.buffer})]]"
            # MLX compares the buffer index with the number of inputs and
            # outputs; reproduce that test exactly.
            if p.buffer < len(launch.inputs) + len(launch.output_names) - 1 or attributes:
                text += ",\n"
            else:
                text += ") {\n"
    for i, p in enumerate(attributes):
        text += f"  {p.type} {p.name} [[{p.name}]]"
        text += ",\n" if i < len(attributes) - 1 else ") {\n"
    text += launch.source
    text += "\n}\n"

    if launch.template:
        instance = name + template_definition(launch.template)
        text += (
            f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({instance}) {instance};\n'
        )
    return text


def harness_source(launch) -> str:
    """Return the C++ form of the generated kernel plus its per-thread entry point.

    Raises:
        ValueError: when the generated Metal signature would be malformed
            (MLX writes ``) {`` early when outputs follow shape buffers and
            the body uses no thread attribute), so the harness rejects what
            MLX could not compile either.
    """
    name = kernel_name(launch)
    params = parameters(launch)
    attributes = [p for p in params if p.kind == "attribute"]
    outputs = [p for p in params if p.kind == "output"]
    last_buffer = len(launch.inputs) + len(outputs) - 1
    if not attributes and any(p.buffer >= last_buffer for p in outputs[:-1]):
        raise ValueError(
            f"kernel '{launch.name}': MLX generates a malformed signature when shape, strides or ndim "
            "buffers are used and the body uses no thread attribute"
        )

    header_file = getattr(launch, "header_file", "") or f"{launch.name}.header"
    source_file = getattr(launch, "source_file", "") or f"{launch.name}.body"
    lines = [f'#line 1 "{header_file}"', launch.header, '#line 1 "<generated signature>"']
    if launch.template:
        kinds = []
        for param_name, value in launch.template:
            if isinstance(value, bool):
                kinds.append(f"bool {param_name}")
            elif isinstance(value, int):
                kinds.append(f"int {param_name}")
            else:
                kinds.append(f"typename {param_name}")
        lines.append("template <" + ", ".join(kinds) + ">")

    declared = []
    for p in params:
        if p.kind == "input" and p.scalar:
            declared.append(f"  const {p.type}& {p.name}")
        elif p.kind in ("input", "shape", "strides"):
            declared.append(f"  mtl::buffer<const {p.type}> {p.name}")
        elif p.kind == "ndim":
            declared.append(f"  const int& {p.name}")
        elif p.kind == "output":
            declared.append(f"  mtl::buffer<{p.type}> {p.name}")
        else:
            declared.append(f"  {p.type} {p.name}")
    lines.append(f"void {name}(")
    lines.append(",\n".join(declared) + ") {")
    lines.append(f'#line 1 "{source_file}"')
    lines.append(launch.source)
    lines.append("}")
    lines.append('#line 1 "<generated entry point>"')

    instance = name + (template_definition(launch.template) if launch.template else "")
    arguments = []
    for p in params:
        if p.kind == "attribute":
            value = f"attributes->{p.name}"
            arguments.append(f"mtl::to_uint3({value})" if p.type == "uint3" else value)
            continue
        slot = p.buffer
        if p.kind == "input" and p.scalar:
            arguments.append(f"*static_cast<const {p.type}*>(buffers[{slot}])")
        elif p.kind == "ndim":
            arguments.append(f"*static_cast<const int*>(buffers[{slot}])")
        else:
            const = "" if p.kind == "output" else "const "
            arguments.append(
                f'mtl::buffer<{const}{p.type}>{{static_cast<{const}{p.type}*>(buffers[{slot}]), '
                f'sizes[{slot}], 0, "{p.name}"}}'
            )
    lines.append(
        'extern "C" __attribute__((visibility("default"))) void mtl_kernel_entry(\n'
        "    void* const* buffers, const long long* sizes, const mtl::thread_attributes* attributes) {"
    )
    lines.append(f"  {instance}(\n    " + ",\n    ".join(arguments) + ");")
    lines.append("}")
    return "\n".join(lines) + "\n"
