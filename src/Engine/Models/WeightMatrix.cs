using LocalVllm.Engine.Kernels;
using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Models;

/// <summary>
/// A weight matrix [n, k] as the forward pass keeps it: one tensor (the compute dtype, or bfloat16 under float32
/// compute, in panels where the CPU has AVX-512: <see cref="Bf16Panels"/>), or int8 values with one float32 scale per
/// group of 32 (<see cref="Q8"/>). It knows how to multiply and how to look rows up (the embedding), so the model does
/// not care which it holds.
/// </summary>
internal sealed class WeightMatrix : IDisposable
{
    private WeightMatrix(Tensor values, Tensor? scales, bool panelled = false)
    {
        Values = values;
        Scales = scales;
        IsPanelled = panelled;
    }

    /// <summary>
    /// Whether bfloat16 matrices go into panels where they can (<see cref="Bf16Panels"/>); the environment variable
    /// LOCALVLLM_BF16_PANELS=0 keeps them row-major (for measuring one against the other).
    /// </summary>
    internal static readonly bool UsePanels = Environment.GetEnvironmentVariable("LOCALVLLM_BF16_PANELS") != "0";

    /// <summary>The stored values: [n, k] in float32, bfloat16, float16, or int8 when <see cref="Scales"/> is set.</summary>
    public Tensor Values { get; }

    /// <summary>For int8 values: float32 [n, k / 32], one scale per group of 32 weights.</summary>
    public Tensor? Scales { get; }

    /// <summary>Whether the values are bfloat16 laid out in <see cref="Bf16Panels"/>' panels rather than row-major.</summary>
    public bool IsPanelled { get; }

    /// <summary>Whether the values are int8 with scales.</summary>
    public bool IsQuantized => Scales is not null;

    /// <summary>Bytes the matrix occupies.</summary>
    public long Bytes => Values.NumberOfElements * Values.ElementSize + (Scales is null ? 0 : Scales.NumberOfElements * Scales.ElementSize);

    /// <summary>A matrix kept as <paramref name="values"/> (owned from now on).</summary>
    public static WeightMatrix Plain(Tensor values) => new(values, null);

    /// <summary>
    /// A bfloat16 CPU matrix (owned from now on) rearranged into panels where the CPU runs their kernel and the shape
    /// fits (<see cref="Bf16Panels.Fits"/>); kept as it is otherwise.
    /// </summary>
    public static WeightMatrix Bf16(Tensor values)
    {
        if (!UsePanels || values.dtype != ScalarType.BFloat16 || values.device_type != TorchSharp.DeviceType.CPU
            || !values.is_contiguous() || !Bf16Panels.Supported || !Bf16Panels.Fits(values.shape[0], values.shape[1]))
            return Plain(values);
        Bf16Panels.PackInPlace(values);
        return new WeightMatrix(values, null, panelled: true);
    }

    /// <summary>
    /// The checkpoint tensors <paramref name="keys"/> (each [rows_i, k]) stacked by rows and quantized to int8 straight
    /// from the loader's mapping, or, when k is not whole groups of 32, read and concatenated as
    /// <paramref name="fallback"/> does.
    /// </summary>
    public static unsafe WeightMatrix ReadQuantized(Loading.WeightLoader weights, IReadOnlyList<string> keys, long[][] shapes, Func<WeightMatrix> fallback)
    {
        long k = shapes[0][1], n = shapes.Sum(s => s[0]);
        if (!Q8.Fits(k)) return fallback();
        var q = empty([n, k], ScalarType.Int8);
        var s = empty([n, k / Q8.Group], ScalarType.Float32);
        sbyte* qp = (sbyte*)Simd.Pointer(q);
        float* sp = Simd.Pointer(s);
        long row = 0;
        for (int i = 0; i < keys.Count; i++)
        {
            var (data, dtype) = weights.Raw(keys[i]);
            Q8.QuantizeRaw((byte*)data, dtype, shapes[i][0], k, qp + row * k, sp + row * k / Q8.Group);
            row += shapes[i][0];
        }
        return new WeightMatrix(q, s);
    }

    /// <summary>
    /// x W^T + b, through the C# CPU kernels when <paramref name="cpuKernels"/> (which int8 requires). With int8
    /// weights the inputs are quantized too where the CPU has AVX-VNNI, unless <paramref name="quantizeInputs"/> is false.
    /// </summary>
    public Tensor Linear(Tensor x, Tensor? bias, bool cpuKernels, bool quantizeInputs = true)
    {
        if (IsPanelled)
        {
            if (x.dtype != ScalarType.Float32 || x.device_type != TorchSharp.DeviceType.CPU)
                throw new ArgumentException($"A bfloat16 matrix in panels takes float32 CPU inputs, not {x.dtype} on {x.device}.", nameof(x));
            var y = Bf16Panels.Apply(x, Values);
            if (bias is not null) HeldScalars.AddInPlace(y, bias);
            return y;
        }
        return cpuKernels || IsQuantized ? SmallBatchLinear.Apply(x, Values, bias, scales: Scales, quantizeInputs: quantizeInputs) : F.linear(x, Values, bias);
    }

    /// <summary>Rows <paramref name="ids"/> (int64) in <paramref name="dtype"/> (widened or dequantized when stored otherwise).</summary>
    public unsafe Tensor Rows(Tensor ids, ScalarType dtype)
    {
        if (IsPanelled)
        {
            var widened = Bf16Panels.Rows(Values, ids);
            if (dtype == ScalarType.Float32) return widened;
            using (widened) return widened.to(dtype);
        }
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
    public WeightMatrix Alias() => new(Values.alias(), Scales?.alias(), IsPanelled);

    /// <summary>Advises the kernel to back the values with huge pages.</summary>
    public void AdviseHugePages() => HugePages.Advise(Values);

    public void Dispose()
    {
        Values.Dispose();
        Scales?.Dispose();
    }
}
