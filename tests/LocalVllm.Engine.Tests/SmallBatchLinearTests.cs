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
    [InlineData(64, 1024, 97, true)]
    [InlineData(65, 64, 16, false)] // two full blocks and a 16-row block (libtorch's path without AVX-512)
    [InlineData(300, 96, 40, true)]
    [InlineData(300, 512, 40, false)] // packing split over k
    [InlineData(600, 64, 24, true)] // three panels of rows (256, 256, 88)
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
