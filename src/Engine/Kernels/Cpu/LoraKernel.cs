using System.Numerics;
using TorchSharp;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// A LoRA update on a few float32 rows, in C#: <c>output[i] += (x[i] A^T) B^T</c> for rows <c>start .. start+count</c>,
/// each row on one thread of <see cref="CpuWorkers"/>. Two libtorch products per projection cost far more than their
/// arithmetic on small batches (each one a dispatch and a parallel region beside the engine's own workers); this is
/// what decode steps use. <see cref="System.Numerics.Vector{T}"/> runs on any host (SSE to AVX-512), so there is no
/// separate fallback path.
/// </summary>
internal static unsafe class LoraKernel
{
    /// <summary>The most rows this kernel takes; more (prefill) go to libtorch's matrix products.</summary>
    public const int MaxRows = 32;

    /// <summary>
    /// Whether the kernel applies: float32 contiguous CPU tensors, <paramref name="count"/> rows at most
    /// <see cref="MaxRows"/>, a rank that fits the stack.
    /// </summary>
    public static bool Supports(Tensor x, Tensor at, Tensor bt, Tensor output, long count) =>
        count <= MaxRows && at.shape[1] <= 1024
        && x.dtype == ScalarType.Float32 && at.dtype == ScalarType.Float32 && bt.dtype == ScalarType.Float32 && output.dtype == ScalarType.Float32
        && x.device_type == DeviceType.CPU && x.is_contiguous() && at.is_contiguous() && bt.is_contiguous() && output.is_contiguous();

    /// <summary>
    /// For each run (rows <c>Start .. Start+Count</c> of <paramref name="x"/> [tokens, in] and <paramref name="output"/>
    /// [tokens, out], with that run's <c>AT</c> [in, R] and <c>BT</c> [R, out]), adds <c>(x[i] AT) BT</c> to <c>output[i]</c>:
    /// every row of every run in one parallel loop.
    /// </summary>
    public static void AddUpdates(Tensor x, Tensor output, IReadOnlyList<(long Start, long Count, Tensor AT, Tensor BT)> runs)
    {
        int inDim = (int)x.shape[1], outDim = (int)output.shape[1];
        float* px = Simd.Pointer(x), po = Simd.Pointer(output);
        var rows = new (long Row, nint AT, nint BT, int Rank)[runs.Sum(r => (int)r.Count)];
        int n = 0;
        foreach (var (start, count, at, bt) in runs)
            for (long i = 0; i < count; i++) rows[n++] = (start + i, (nint)Simd.Pointer(at), (nint)Simd.Pointer(bt), (int)at.shape[1]);
        CpuWorkers.Shared.For(rows.Length, i =>
        {
            var (row, at, bt, rank) = rows[i];
            Row(px + row * inDim, (float*)at, (float*)bt, po + row * outDim, inDim, rank, outDim);
        });
    }

    private static void Row(float* x, float* at, float* bt, float* o, int inDim, int rank, int outDim)
    {
        float* xa = stackalloc float[rank];
        new Span<float>(xa, rank).Clear();
        for (int k = 0; k < inDim; k++) Axpy(xa, at + (long)k * rank, x[k], rank); // xa = x A^T: the rows of AT, scaled by x
        for (int r = 0; r < rank; r++) Axpy(o, bt + (long)r * outDim, xa[r], outDim); // o += xa B^T: the rows of BT, scaled by xa
    }

    /// <summary><c>y += a x</c> over <paramref name="n"/> floats (nothing to do when <paramref name="a"/> is 0).</summary>
    private static void Axpy(float* y, float* x, float a, int n)
    {
        if (a == 0) return;
        var s = new Vector<float>(a);
        int i = 0;
        for (; i + Vector<float>.Count <= n; i += Vector<float>.Count)
            (Vector.LoadUnsafe(ref x[i]) * s + Vector.LoadUnsafe(ref y[i])).StoreUnsafe(ref y[i]);
        for (; i < n; i++) y[i] += a * x[i];
    }
}
