using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Tests;

/// <summary>The weight-streaming small-batch linear equals libtorch's linear.</summary>
[Trait("Category", "Kernels")]
public sealed class SmallBatchLinearTests
{
    [Theory]
    [InlineData(1, 64, 160, false)]
    [InlineData(1, 1000, 37, true)] // single row: 512-bit blocks of 64, then the 256-bit tail of 40
    [InlineData(1, 37, 5, false)] // single row shorter than one block
    [InlineData(2, 1000, 37, true)] // two rows: 512-bit blocks of 32, then the 256-bit tail of 8
    [InlineData(2, 24, 9, false)] // two rows shorter than one block
    [InlineData(3, 1024, 333, true)]
    [InlineData(4, 37, 5, true)]
    [InlineData(16, 1024, 97, false)]
    [InlineData(7, 40, 9, true)] // odd rows and a length that is not a multiple of 8
    [InlineData(31, 1024, 100, true)]
    [InlineData(3, 256, 64, false)] // the broadcast kernel from here on (AVX-512): four k per lane group
    [InlineData(4, 36, 17, true)]
    [InlineData(5, 256, 64, false)] // two k per lane group
    [InlineData(8, 1024, 40, true)]
    [InlineData(8, 30, 9, false)] // k not a multiple of 4
    [InlineData(9, 200, 24, false)] // 9-12 rows: three blocks of four rows fed by each weight quad
    [InlineData(10, 36, 17, true)]
    [InlineData(12, 1024, 40, false)]
    [InlineData(10, 30, 9, true)] // k not a multiple of 4: one 16-row block
    [InlineData(16, 3072, 40, true)]
    [InlineData(17, 128, 19, false)] // a 32-row block padded; 19 = two 8-row tiles + 3 rows left
    [InlineData(32, 100, 24, true)]
    [InlineData(33, 64, 32, false)] // a full block and a 16-row block
    [InlineData(48, 72, 8, false)]
    [InlineData(45, 64, 40, true)] // a full block and a 16-row block of 13 rows: one register transpose and five rows left
    [InlineData(64, 1024, 97, true)]
    [InlineData(65, 64, 16, false)] // two full blocks and a 16-row block (libtorch's path without AVX-512)
    [InlineData(300, 96, 40, true)]
    [InlineData(300, 512, 40, false)] // packing split over k
    [InlineData(600, 64, 24, true)] // three panels of rows (256, 256, 88)
    [InlineData(1100, 96, 48, false)] // a prefill chunk: five panels, the last of 76 rows
    public void Small_batch_linear_equals_torch_linear(int rows, int inFeatures, int outFeatures, bool withBias)
    {
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(7);
        var x = randn([rows, inFeatures], generator: g);
        var w = randn([outFeatures, inFeatures], generator: g) / MathF.Sqrt(inFeatures);
        var b = withBias ? randn([outFeatures], generator: g) : null;
        var expected = F.linear(x, w, b);
        var actual = SmallBatchLinear.Apply(x, w, b);
        Assert.Equal(expected.shape, actual.shape);
        Assert.True((expected - actual).abs().max().item<float>() < 1e-4f);
    }

    /// <summary>
    /// bfloat16 weights (as a bf16 checkpoint is kept in memory) against libtorch's float32 linear over the same values
    /// widened: widening is exact, so only the order of the additions differs. Row counts cover the dot kernel with
    /// one, two and three rows, every broadcast layout, and the widened-tile libtorch path above the kernels' rows
    /// (several 256-feature tiles and a partial one).
    /// </summary>
    [Theory]
    [InlineData(1, 64, 160, false)]
    [InlineData(1, 1000, 37, true)] // k not a multiple of 16: the scalar tail
    [InlineData(2, 1024, 96, false)]
    [InlineData(2, 40, 9, true)]
    [InlineData(2, 32, 151936, false)] // tiny-qwen3-chat's LM head: 16-wide paired blocks without AVX-512
    [InlineData(3, 1024, 333, true)]
    [InlineData(4, 36, 17, true)]
    [InlineData(5, 256, 64, false)]
    [InlineData(10, 36, 17, true)]
    [InlineData(17, 128, 19, false)]
    [InlineData(33, 64, 32, false)]
    [InlineData(64, 1024, 97, true)]
    [InlineData(600, 64, 24, true)]
    [InlineData(520, 64, 600, true)]
    public void Bf16_weights_equal_torch_linear_over_the_widened_weights(int rows, int inFeatures, int outFeatures, bool withBias)
    {
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(5);
        var x = randn([rows, inFeatures], generator: g);
        var w = (randn([outFeatures, inFeatures], generator: g) / MathF.Sqrt(inFeatures)).to(ScalarType.BFloat16);
        var b = withBias ? randn([outFeatures], generator: g) : null;
        var expected = F.linear(x, w.to(ScalarType.Float32), b);
        var actual = SmallBatchLinear.Apply(x, w, b);
        Assert.Equal(ScalarType.Float32, actual.dtype);
        Assert.Equal(expected.shape, actual.shape);
        Assert.True((expected - actual).abs().max().item<float>() < 1e-4f);
    }

    [SkippableTheory]
    [InlineData("Dot", 1, 64, 24)]
    [InlineData("Dot", 2, 1024, 100)]
    [InlineData("Dot", 7, 48, 100)]
    [InlineData("Dot", 64, 128, 8)]
    [InlineData("Broadcast", 1, 64, 24)]
    [InlineData("Broadcast", 6, 1024, 100)]
    [InlineData("Broadcast", 11, 64, 24)]
    [InlineData("Broadcast", 29, 256, 64)]
    [InlineData("Broadcast", 64, 128, 13)]
    public void Each_kernel_with_bf16_weights_equals_torch_linear(string kernelName, int rows, int inFeatures, int outFeatures)
    {
        var kernel = Enum.Parse<SmallBatchLinear.Kernel>(kernelName);
        Skip.If(kernel == SmallBatchLinear.Kernel.Broadcast && !SmallBatchLinear.BroadcastSupported, "the broadcast kernel needs AVX-512");
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(13);
        var x = randn([rows, inFeatures], generator: g);
        var w = (randn([outFeatures, inFeatures], generator: g) / MathF.Sqrt(inFeatures)).to(ScalarType.BFloat16);
        var expected = F.linear(x, w.to(ScalarType.Float32));
        var actual = SmallBatchLinear.Apply(x, w, null, kernel);
        Assert.True((expected - actual).abs().max().item<float>() < 1e-4f, $"{kernel} kernel, {rows} rows");
    }

    /// <summary>Widening agrees with libtorch's bfloat16 -> float32 conversion, special values included.</summary>
    [Fact]
    public unsafe void Bf16_widening_agrees_with_libtorch()
    {
        using var scope = NewDisposeScope();
        var values = cat([randn([4096]) * 1000, tensor(new[] { 0f, -0f, 1f, float.Epsilon, float.MaxValue, float.PositiveInfinity, float.NegativeInfinity, 1.00390625f, 1.01171875f })]);
        var rounded = values.to(ScalarType.BFloat16);
        var widened = rounded.to(ScalarType.Float32);
        ushort* bits = Simd.Bf16Pointer(rounded);
        var mine = new float[values.shape[0]];
        fixed (float* m = mine) Bf16.Widen(bits, m, mine.Length);
        var theirs = widened.data<float>().ToArray();
        for (int i = 0; i < mine.Length; i++) Assert.Equal(theirs[i], mine[i]);
    }

    /// <summary>Each kernel on its own, whatever row count the automatic choice would give it.</summary>
    [SkippableTheory]
    [InlineData("Dot", 1, 64, 24)]
    [InlineData("Dot", 3, 1024, 100)]
    [InlineData("Dot", 7, 34, 100)]
    [InlineData("Dot", 16, 40, 17)]
    [InlineData("Dot", 64, 128, 8)]
    [InlineData("Broadcast", 1, 64, 24)]
    [InlineData("Broadcast", 6, 1024, 100)]
    [InlineData("Broadcast", 11, 64, 24)]
    [InlineData("Broadcast", 29, 256, 64)]
    [InlineData("Broadcast", 64, 128, 8)]
    public void Each_kernel_equals_torch_linear_at_any_row_count(string kernelName, int rows, int inFeatures, int outFeatures)
    {
        var kernel = Enum.Parse<SmallBatchLinear.Kernel>(kernelName);
        Skip.If(kernel == SmallBatchLinear.Kernel.Broadcast && !SmallBatchLinear.BroadcastSupported, "the broadcast kernel needs AVX-512");
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(11);
        var x = randn([rows, inFeatures], generator: g);
        var w = randn([outFeatures, inFeatures], generator: g) / MathF.Sqrt(inFeatures);
        var expected = F.linear(x, w);
        var actual = SmallBatchLinear.Apply(x, w, null, kernel);
        Assert.True((expected - actual).abs().max().item<float>() < 1e-4f, $"{kernel} kernel, {rows} rows");
    }
}
