using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Models;

/// <summary>
/// A weight matrix [n, k] as the forward pass keeps it: one tensor (the compute dtype, or bfloat16 under float32
/// compute), or int8 values with one float32 scale per group of 32 (<see cref="Q8"/>). It knows how to multiply and
/// how to look rows up (the embedding), so the model does not care which it holds.
/// </summary>
internal sealed class WeightMatrix : IDisposable
{
    private WeightMatrix(Tensor values, Tensor? scales)
    {
        Values = values;
        Scales = scales;
    }

    /// <summary>The stored values: [n, k] in float32, bfloat16, float16, or int8 when <see cref="Scales"/> is set.</summary>
    public Tensor Values { get; }

    /// <summary>For int8 values: float32 [n, k / 32], one scale per group of 32 weights.</summary>
    public Tensor? Scales { get; }

    /// <summary>Whether the values are int8 with scales.</summary>
    public bool IsQuantized => Scales is not null;

    /// <summary>Bytes the matrix occupies.</summary>
    public long Bytes => Values.NumberOfElements * Values.ElementSize + (Scales is null ? 0 : Scales.NumberOfElements * Scales.ElementSize);

    /// <summary>A matrix kept as <paramref name="values"/> (owned from now on).</summary>
    public static WeightMatrix Plain(Tensor values) => new(values, null);

    /// <summary>
    /// <paramref name="source"/> (owned and disposed) quantized to int8 when its rows are whole groups of 32; otherwise
    /// kept as it is (llama.cpp likewise leaves such tensors unquantized).
    /// </summary>
    public static WeightMatrix QuantizedOrPlain(Tensor source)
    {
        if (!Q8.Fits(source.shape[1])) return Plain(source);
        using (source)
        {
            var (q, s) = Q8.Quantize(source);
            return new WeightMatrix(q, s);
        }
    }

    /// <summary>x W^T + b, through the C# CPU kernels when <paramref name="cpuKernels"/> (which int8 requires).</summary>
    public Tensor Linear(Tensor x, Tensor? bias, bool cpuKernels) =>
        cpuKernels || IsQuantized ? SmallBatchLinear.Apply(x, Values, bias, scales: Scales) : F.linear(x, Values, bias);

    /// <summary>Rows <paramref name="ids"/> (int64) in <paramref name="dtype"/> (widened or dequantized when stored otherwise).</summary>
    public unsafe Tensor Rows(Tensor ids, ScalarType dtype)
    {
        if (Scales is null)
        {
            var rows = Values.index_select(0, ids);
            if (rows.dtype == dtype) return rows;
            using (rows) return rows.to(dtype);
        }
        using var q = Values.index_select(0, ids);
        using var s = Scales.index_select(0, ids);
        var y = empty(q.shape, ScalarType.Float32);
        Q8.Dequantize((sbyte*)Simd.Pointer(q), Simd.Pointer(s), Simd.Pointer(y), q.NumberOfElements);
        if (dtype == ScalarType.Float32) return y;
        using (y) return y.to(dtype);
    }

    /// <summary>A second handle on the same storage (a tied LM head).</summary>
    public WeightMatrix Alias() => new(Values.alias(), Scales?.alias());

    /// <summary>Advises the kernel to back the values with huge pages.</summary>
    public void AdviseHugePages() => HugePages.Advise(Values);

    public void Dispose()
    {
        Values.Dispose();
        Scales?.Dispose();
    }
}
