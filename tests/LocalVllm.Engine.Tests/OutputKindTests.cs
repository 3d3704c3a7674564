using LocalVllm.Engine.Core;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Output kinds as vLLM's RequestOutputKind: the same seeded requests run as cumulative, delta and final-only; the
/// reference is the cumulative run's final output.
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class OutputKindTests
{
    private static readonly SamplingParams Seeded = new()
    {
        N = 2, Temperature = 0.9f, Seed = 11, MaxTokens = 48, IgnoreEos = true, Logprobs = 2, Stop = ["Lily said"],
    };

    private static List<RequestOutput> Run(LlmEngine engine, int[] prompt, SamplingParams sampling)
    {
        var id = engine.AddRequest(prompt, sampling);
        var outputs = new List<RequestOutput>();
        while (engine.HasUnfinishedRequests) outputs.AddRange(engine.Step().Where(o => o.RequestId == id));
        return outputs;
    }

    [Fact]
    public void Delta_outputs_concatenate_to_the_cumulative_output_and_final_only_sends_it_once()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var engine = llm.Engine;
        var prompt = engine.EncodePrompt("Once upon a time, there was a little girl named");

        var cumulative = Run(engine, prompt, Seeded with { OutputKind = RequestOutputKind.Cumulative });
        var deltas = Run(engine, prompt, Seeded with { OutputKind = RequestOutputKind.Delta });
        var finals = Run(engine, prompt, Seeded with { OutputKind = RequestOutputKind.FinalOnly });
        var reference = cumulative[^1];
        Assert.True(reference.Finished);
        Assert.Equal(2, reference.Outputs.Count);
        Assert.True(reference.Outputs.Any(o => o.TokenIds.Count > 5), "the seeded run should generate more than a few tokens");

        // Delta: one output per step in which the request progressed, as cumulative; each completion listed only
        // with news (new tokens or its finish), and the pieces add up exactly.
        Assert.Equal(cumulative.Count, deltas.Count);
        Assert.True(deltas[^1].Finished);
        Assert.All(deltas, d => Assert.All(d.Outputs, c => Assert.True(c.TokenIds.Count > 0 || c.Finished)));
        foreach (var expected in reference.Outputs)
        {
            var pieces = deltas.SelectMany(d => d.Outputs).Where(c => c.Index == expected.Index).ToList();
            Assert.Equal(expected.TokenIds, pieces.SelectMany(c => c.TokenIds));
            Assert.Equal(expected.Text, string.Concat(pieces.Select(c => c.Text)));
            Assert.Equal(expected.Logprobs!.Select(l => (l.TokenId, l.Logprob)), pieces.SelectMany(c => c.Logprobs!).Select(l => (l.TokenId, l.Logprob)));
            Assert.Equal(expected.FinishReason, pieces[^1].FinishReason);
            Assert.Single(pieces, c => c.Finished);
        }

        // Final-only: exactly one output, equal to the cumulative one's end.
        var final = Assert.Single(finals);
        Assert.True(final.Finished);
        foreach (var (a, b) in reference.Outputs.Zip(final.Outputs))
        {
            Assert.Equal(a.TokenIds, b.TokenIds);
            Assert.Equal(a.Text, b.Text);
            Assert.Equal(a.FinishReason, b.FinishReason);
        }
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public void An_aborted_delta_request_ends_with_its_unsent_tokens_and_the_abort()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var engine = llm.Engine;
        var prompt = engine.EncodePrompt("Once upon a time");
        var id = engine.AddRequest(prompt, EngineHarness.Greedy(40) with { OutputKind = RequestOutputKind.Delta });
        var seen = new List<int>();
        for (int i = 0; i < 5; i++)
            foreach (var o in engine.Step()) seen.AddRange(o.Outputs.SelectMany(c => c.TokenIds));
        var last = engine.Abort(id)!;
        Assert.Equal(FinishReasons.Abort, Assert.Single(last.Outputs).FinishReason);
        Assert.Empty(last.Outputs[0].TokenIds); // everything generated was already sent
        Assert.Equal(5, seen.Count);

        var reference = llm.Generate([prompt], EngineHarness.Greedy(5))[0].Outputs[0].TokenIds;
        Assert.Equal(reference, seen);
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public async Task The_async_engine_streams_deltas_that_add_up_to_the_offline_result()
    {
        using var engine = new AsyncLlmEngine(EngineHarness.Options("stories260K"));
        var prompt = engine.Engine.EncodePrompt("Once upon a time");
        var sampling = EngineHarness.Greedy(30) with { Stop = ["."] };
        var ids = new List<int>();
        var text = "";
        await foreach (var o in engine.GenerateAsync(prompt, sampling with { OutputKind = RequestOutputKind.Delta }))
        {
            ids.AddRange(o.Outputs[0].TokenIds);
            text += o.Outputs[0].Text;
        }
        var final = await engine.GenerateFinalAsync(prompt, sampling);
        Assert.Equal(final.Outputs[0].TokenIds, ids);
        Assert.Equal(final.Outputs[0].Text, text);
    }

    [Fact]
    public void A_stream_interval_sends_the_first_token_at_once_then_every_interval_tokens_and_the_same_result()
    {
        const int interval = 4;
        using var plain = new Llm(EngineHarness.Options("stories260K"));
        using var gathered = new Llm(EngineHarness.Options("stories260K", o => o.StreamInterval = interval));
        var prompt = plain.Engine.EncodePrompt("Once upon a time, there was a little girl named");

        // Delta outputs (n = 2, seeded, a stop string, logprobs): the pieces add up to the plain run's cumulative end;
        // each completion's first tokens come in the step that made them, and later outputs wait for the interval
        // unless the completion (one of the two) or the request finished.
        var reference = Run(plain.Engine, prompt, Seeded with { OutputKind = RequestOutputKind.Cumulative })[^1];
        var stepsPlain = Run(plain.Engine, prompt, Seeded with { OutputKind = RequestOutputKind.Delta });
        var deltas = Run(gathered.Engine, prompt, Seeded with { OutputKind = RequestOutputKind.Delta });
        Assert.True(deltas.Count < stepsPlain.Count * 2 / 3, $"{deltas.Count} outputs with an interval of {interval} against {stepsPlain.Count} without");
        Assert.True(deltas[^1].Finished);
        foreach (var expected in reference.Outputs)
        {
            var pieces = deltas.Select(d => d.Outputs.SingleOrDefault(c => c.Index == expected.Index)).ToList();
            var sent = pieces.Where(c => c is not null).Select(c => c!).ToList();
            Assert.Equal(expected.TokenIds, sent.SelectMany(c => c.TokenIds));
            Assert.Equal(expected.Text, string.Concat(sent.Select(c => c.Text)));
            Assert.Equal(expected.Logprobs!.Select(l => (l.TokenId, l.Logprob)), sent.SelectMany(c => c.Logprobs!).Select(l => (l.TokenId, l.Logprob)));
            Assert.Equal(expected.FinishReason, sent[^1].FinishReason);
            Assert.Single(sent[0].TokenIds); // the first token alone, in the first output
            Assert.Equal(0, pieces.IndexOf(sent[0]));
            foreach (var c in sent.Skip(1).Where(c => !c.Finished)) Assert.True(c.TokenIds.Count >= interval, $"an unfinished output carried {c.TokenIds.Count} tokens");
        }
        // One token per step here, so between the first output and the finish an output goes out every interval steps.
        Assert.All(deltas.Take(deltas.Count - 1).Skip(1), d => Assert.Contains(d.Outputs, c => c.TokenIds.Count == interval));

        // Cumulative outputs follow the same rhythm and end the same; final-only is unchanged.
        var cumulative = Run(gathered.Engine, prompt, Seeded with { OutputKind = RequestOutputKind.Cumulative });
        Assert.Equal(deltas.Count, cumulative.Count);
        foreach (var (a, b) in reference.Outputs.Zip(cumulative[^1].Outputs))
        {
            Assert.Equal(a.TokenIds, b.TokenIds);
            Assert.Equal(a.Text, b.Text);
        }
        Assert.Single(Run(gathered.Engine, prompt, Seeded with { OutputKind = RequestOutputKind.FinalOnly }));
        EngineHarness.AssertNoLeaks(gathered.Engine);
    }

    [Fact]
    public void A_stream_interval_below_one_is_refused_by_name()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => new Llm(EngineHarness.Options("stories260K", o => o.StreamInterval = 0)));
        Assert.Contains("StreamInterval", e.Message);
    }

    /// <summary>Logit bias end to end: +100 forces a token at every step, -100 keeps the plain run's first token out.</summary>
    [Fact]
    public void Logit_bias_forces_or_bans_tokens_in_a_greedy_run_and_bad_values_are_named()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var prompt = llm.Engine.EncodePrompt("Once upon a time");
        var plain = llm.Generate([prompt], EngineHarness.Greedy(6))[0].Outputs[0].TokenIds;
        int forced = Enumerable.Range(3, 500).First(t => !plain.Contains(t));
        var always = llm.Generate([prompt], EngineHarness.Greedy(6) with { LogitBias = new Dictionary<int, float> { [forced] = 100 } })[0].Outputs[0].TokenIds;
        Assert.All(always, t => Assert.Equal(forced, t));
        var banned = llm.Generate([prompt], EngineHarness.Greedy(6) with { LogitBias = new Dictionary<int, float> { [plain[0]] = -100 } })[0].Outputs[0].TokenIds;
        Assert.NotEqual(plain[0], banned[0]);
        Assert.Contains("outside the vocabulary", Assert.Throws<ArgumentOutOfRangeException>(() =>
            llm.Generate([prompt], EngineHarness.Greedy(2) with { LogitBias = new Dictionary<int, float> { [100_000] = 1 } })).Message);
        Assert.Contains("must be in [-100, 100]", Assert.Throws<ArgumentOutOfRangeException>(() =>
            llm.Generate([prompt], EngineHarness.Greedy(2) with { LogitBias = new Dictionary<int, float> { [5] = 101 } })).Message);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }
}
