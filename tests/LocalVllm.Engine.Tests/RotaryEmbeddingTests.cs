using LocalVllm.Engine.Models;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// RoPE scaling types without a fixture reference (llama3 is covered by tiny-llama's logits) checked against their
/// definitions: linear divides positions by the factor; dynamic (NTK) leaves positions inside the original context
/// alone and beyond it raises the base by ((factor * len / original) - (factor - 1)) ^ (dim / (dim - 2)).
/// </summary>
[Trait("Category", "Kernels")]
public sealed class RotaryEmbeddingTests
{
    private static ModelConfig Config(RopeScaling scaling) => ModelConfig.Parse(
        System.Text.Json.Nodes.JsonNode.Parse("""{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":32,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":64}""")!.AsObject(), "test")
        with { RopeScaling = scaling };

    private static float[] Cos(ModelConfig c, long[] positions, int maxPosition)
    {
        using var rope = new RotaryEmbedding(c, CPU);
        using var p = tensor(positions);
        var (cos, sin) = rope.CosSin(p, maxPosition);
        using (sin) using (cos) return cos.data<float>().ToArray();
    }

    [Fact]
    public void Linear_scaling_divides_positions_by_the_factor()
    {
        var plain = Cos(Config(new RopeScaling("default")), [3, 5, 11], 11);
        var linear = Cos(Config(new RopeScaling("linear", Factor: 4)), [12, 20, 44], 44);
        for (int i = 0; i < plain.Length; i++) Assert.Equal(plain[i], linear[i], 4);
    }

    [Fact]
    public void Dynamic_scaling_is_plain_inside_the_original_context_and_ntk_beyond_it()
    {
        var c = Config(new RopeScaling("dynamic", Factor: 2));
        long[] positions = [1, 7, 30];
        Assert.Equal(Cos(Config(new RopeScaling("default")), positions, 30), Cos(c, positions, 30));

        int dim = c.HeadDim, seqLen = 100;
        double theta = c.RopeTheta * Math.Pow(2.0 * seqLen / 64 - 1, dim / (dim - 2.0));
        var expected = positions.SelectMany(p => Enumerable.Range(0, dim).Select(i =>
            (float)Math.Cos(p * (1.0 / Math.Pow(theta, 2.0 * (i % (dim / 2)) / dim))))).ToArray();
        var actual = Cos(c, positions, seqLen - 1);
        for (int i = 0; i < expected.Length; i++) Assert.Equal(expected[i], actual[i], 4);
    }
}
