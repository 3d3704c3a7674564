using LocalVllm.Engine.Models;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Tests;

/// <summary>The weight-streaming small-batch linear equals libtorch's linear.</summary>
public sealed class SmallBatchLinearTests
{
    [Theory]
    [InlineData(1, 64, 160, false)]
    [InlineData(3, 1024, 333, true)]
    [InlineData(4, 37, 5, true)]
    [InlineData(16, 1024, 97, false)]
    [InlineData(7, 40, 9, true)] // odd rows and a length that is not a multiple of 8
    [InlineData(31, 1024, 100, true)]
    [InlineData(33, 64, 32, false)] // above MaxRows: libtorch's path
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
}
