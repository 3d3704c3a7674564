using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>The huge-page advice is only a hint: the tensor's contents stay exactly as they were.</summary>
public sealed class HugePagesTests
{
    [Theory]
    [InlineData(3 << 20)] // 12 MB: spans several 2 MiB pages, unaligned at both ends
    [InlineData(1000)] // too small to advise: untouched
    public void Advising_a_tensor_keeps_its_contents(int elements)
    {
        using var scope = NewDisposeScope();
        var t = randn([elements], generator: new TorchSharp.torch.Generator(1));
        var copy = t.clone();
        HugePages.Advise(t);
        Assert.True(t.equal(copy).all().item<bool>());
    }
}
