using LocalVllm.Engine.Core;
using LocalVllm.Engine.Execution;
using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>The sampler's filters and penalties against a direct computation on known logits.</summary>
[Trait("Category", "Kernels")]
public sealed class SamplerTests
{
    private static readonly float[] Logits = [2.0f, 1.0f, 0.5f, 3.0f, -1.0f, 0.0f, 2.5f, -3.0f];

    private static double[] Softmax(IEnumerable<double> xs)
    {
        var a = xs.ToArray();
        double m = a.Where(double.IsFinite).Max();
        var e = a.Select(x => double.IsFinite(x) ? Math.Exp(x - m) : 0).ToArray();
        double s = e.Sum();
        return e.Select(x => x / s).ToArray();
    }

    /// <summary>Direct computation: temperature, top-k, top-p, min-p, one token at a time.</summary>
    private static double[] Direct(SamplingParams p)
    {
        var scaled = Logits.Select(x => x / (double)p.Temperature).ToArray();
        var order = Enumerable.Range(0, scaled.Length).OrderByDescending(i => scaled[i]).ToArray();
        var keep = new bool[scaled.Length];
        int k = p.TopK > 0 ? p.TopK : scaled.Length;
        for (int r = 0; r < k; r++) keep[order[r]] = true;
        var probs = Softmax(scaled.Select((x, i) => keep[i] ? x : double.NegativeInfinity));
        double mass = 0;
        foreach (var i in order)
        {
            if (!keep[i]) continue;
            if (mass > p.TopP && i != order[0]) keep[i] = false;
            mass += probs[i];
        }
        probs = Softmax(scaled.Select((x, i) => keep[i] ? x : double.NegativeInfinity));
        double max = probs.Max();
        for (int i = 0; i < probs.Length; i++) if (probs[i] < p.MinP * max) keep[i] = false;
        return Softmax(scaled.Select((x, i) => keep[i] ? x : double.NegativeInfinity));
    }

    [Theory]
    [InlineData(1.0f, 0, 1.0f, 0.0f)]
    [InlineData(0.7f, 3, 1.0f, 0.0f)]
    [InlineData(1.0f, 0, 0.6f, 0.0f)]
    [InlineData(1.3f, 0, 1.0f, 0.2f)]
    [InlineData(0.9f, 5, 0.8f, 0.05f)]
    public void Filters_match_a_direct_computation(float temperature, int topK, float topP, float minP)
    {
        using var scope = NewDisposeScope();
        var p = new SamplingParams { Temperature = temperature, TopK = topK, TopP = topP, MinP = minP };
        var probsSorted = Sampler.FilteredProbabilities(tensor(Logits).unsqueeze(0), [p], out var order);
        var ids = order[0].data<long>().ToArray();
        var values = probsSorted[0].data<float>().ToArray();
        var mine = new double[Logits.Length];
        for (int j = 0; j < ids.Length; j++) mine[ids[j]] = values[j];
        var expected = Direct(p);
        for (int i = 0; i < Logits.Length; i++) Assert.True(Math.Abs(mine[i] - expected[i]) < 1e-6, $"token {i}: {mine[i]} vs {expected[i]}");
    }

    [Fact]
    public void ArgMax_equals_torch_argmax_with_ties_infinities_and_nan()
    {
        using var scope = NewDisposeScope();
        var logits = randn([6, 1003], generator: new TorchSharp.torch.Generator(4));
        logits[1, 500] = logits[1].max() + 1; logits[1, 900] = logits[1, 500]; // a tie: the first wins
        logits[2].fill_(float.NegativeInfinity); // all -inf: index 0
        logits[3, 1002] = 1e9f; // in the scalar tail
        logits[4, 7] = 1e9f; logits[4, 600] = float.NaN; // a NaN wins over a larger value before it
        logits[5, 3] = float.PositiveInfinity;
        var expected = logits.argmax(-1).data<long>().ToArray();
        Assert.Equal(expected, CpuArgMax.ArgMax(logits));
        Assert.Equal([500L, 0L, 1002L, 600L, 3L], CpuArgMax.ArgMax(logits).Skip(1));
    }

    [Fact]
    public void Draws_follow_the_cumulative_distribution()
    {
        using var scope = NewDisposeScope();
        var p = new SamplingParams { Temperature = 1.0f, TopK = 3 };
        var expected = Direct(p);
        var order = Enumerable.Range(0, Logits.Length).OrderByDescending(i => Logits[i]).ToArray();
        double cum = 0;
        foreach (var i in order.Take(3))
        {
            double mid = cum + expected[i] / 2;
            Assert.Equal(i, Sampler.SampleRows(tensor(Logits).unsqueeze(0), [p], [mid])[0]);
            cum += expected[i];
        }
    }

    [Fact]
    public void Penalties_match_a_direct_computation()
    {
        using var scope = NewDisposeScope();
        var p = new SamplingParams { RepetitionPenalty = 1.5f, PresencePenalty = 0.5f, FrequencyPenalty = 0.25f };
        var seq = new Sequence("r", 0, [3, 4], p, 0);
        seq.Append(0); seq.Append(0); seq.Append(6);
        var result = Sampler.ApplyPenalties(tensor(Logits).unsqueeze(0), [seq])[0].data<float>().ToArray();
        var expected = Logits.ToArray();
        foreach (var t in new[] { 3, 4, 0, 6 }) expected[t] = expected[t] > 0 ? expected[t] / 1.5f : expected[t] * 1.5f;
        expected[0] -= 0.5f + 0.25f * 2;
        expected[6] -= 0.5f + 0.25f * 1;
        for (int i = 0; i < Logits.Length; i++) Assert.Equal(expected[i], result[i], 5);
    }

    [Fact]
    public void Logit_bias_is_added_before_the_penalties_and_moves_greedy_choices()
    {
        using var scope = NewDisposeScope();
        var bias = new Dictionary<int, float> { [7] = 4.5f, [3] = -1.25f };
        var p = new SamplingParams { RepetitionPenalty = 1.5f, LogitBias = bias };
        var seq = new Sequence("b", 0, [3], p, 0);
        var result = Sampler.ApplyPenalties(tensor(Logits).unsqueeze(0), [seq])[0].data<float>().ToArray();
        var expected = Logits.ToArray();
        foreach (var (t, b) in bias) expected[t] += b;
        expected[3] = expected[3] > 0 ? expected[3] / 1.5f : expected[3] * 1.5f; // the prompt's token, after its bias
        for (int i = 0; i < Logits.Length; i++) Assert.Equal(expected[i], result[i], 5);

        int Greedy(Dictionary<int, float> b) => new Sampler().Sample(tensor(Logits).unsqueeze(0), [new Sequence("g", 0, [1], new SamplingParams { Temperature = 0, LogitBias = b }, 0)])[0].TokenId;
        Assert.Equal(7, Greedy(new() { [7] = 100 }));    // the lowest logit, forced
        Assert.Equal(6, Greedy(new() { [3] = -100 }));   // the highest, banned: the runner-up
    }

    [Fact]
    public void Greedy_is_exact_argmax_even_with_penalty_free_params()
    {
        using var scope = NewDisposeScope();
        var seq = new Sequence("g", 0, [1], new SamplingParams { Temperature = 0 }, 0);
        var sampled = new Sampler().Sample(tensor(Logits).unsqueeze(0), [seq]);
        Assert.Equal(Array.IndexOf(Logits, Logits.Max()), sampled[0].TokenId);
    }
}
