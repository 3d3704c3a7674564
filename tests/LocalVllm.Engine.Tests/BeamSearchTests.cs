namespace LocalVllm.Engine.Tests;

/// <summary>
/// Beam search (vLLM's <c>LLM.beam_search</c>) on the trained stories260K model, against a search written out here
/// over the logits of one plain pass per sequence, and against greedy decoding.
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class BeamSearchTests
{
    private static readonly string[] Texts = ["Once upon a time", "The little dog"];

    [Fact]
    public void Width_one_is_greedy_decoding_with_its_log_probabilities()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var ids = llm.Engine.EncodePrompt(Texts[0]);
        var beam = Assert.Single(llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 1, MaxTokens = 24, IgnoreEos = true })[0].Sequences);
        var greedy = llm.Generate([ids], EngineHarness.Greedy(24) with { Logprobs = 0 })[0].Outputs[0];

        Assert.Equal(greedy.TokenIds, beam.TokenIds);
        Assert.Equal(greedy.Text, beam.Text);
        double sum = greedy.Logprobs!.Sum(p => (double)p.Logprob);
        Assert.Equal(sum, beam.CumulativeLogprob, 1e-4);
        Assert.Equal(sum / (ids.Length + 24), beam.Score, 1e-6);
        Assert.Equal(FinishReasons.Length, beam.FinishReason);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Theory]
    [InlineData(true, 1.0)]
    [InlineData(false, 1.0)]
    [InlineData(true, 0.0)]
    public void Beams_are_those_of_a_search_over_one_plain_pass_per_sequence(bool prefixCaching, double lengthPenalty)
    {
        using var llm = new Llm(EngineHarness.Options("stories260K", o => o.EnablePrefixCaching = prefixCaching));
        var prompts = Texts.Select(t => (IReadOnlyList<int>)llm.Engine.EncodePrompt(t)).ToArray();
        var p = new BeamSearchParams { BeamWidth = 3, MaxTokens = 7, IgnoreEos = true, LengthPenalty = lengthPenalty };
        var outputs = llm.BeamSearch(prompts, p);
        EngineHarness.AssertNoLeaks(llm.Engine);

        for (int i = 0; i < prompts.Length; i++)
        {
            var expected = ReferenceSearch(llm.Engine, prompts[i].ToArray(), p);
            var got = outputs[i].Sequences;
            Assert.Equal(prompts[i], outputs[i].PromptTokenIds);
            Assert.Equal(expected.Count, got.Count);
            for (int b = 0; b < got.Count; b++)
            {
                Assert.Equal(expected[b].Generated, got[b].TokenIds);
                Assert.Equal(expected[b].Cumulative, got[b].CumulativeLogprob, 1e-3);
                Assert.Equal(expected[b].Score, got[b].Score, 1e-3);
            }
            // Best first.
            Assert.True(got.Select(s => s.Score).SequenceEqual(got.Select(s => s.Score).OrderDescending()));
        }
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void A_beam_that_reaches_eos_ends_there_and_is_ranked_without_it()
    {
        // A copy of stories260K whose EOS is the token greedy decoding picks first: the top candidate of step one ends.
        int eos;
        IReadOnlyList<int> ids;
        using (var plain = new Llm(EngineHarness.Options("stories260K")))
        {
            ids = plain.Engine.EncodePrompt(Texts[0]);
            eos = plain.Generate([ids], EngineHarness.Greedy(1))[0].Outputs[0].TokenIds[0];
        }
        var folder = Directory.CreateTempSubdirectory("beam-eos").FullName;
        try
        {
            foreach (var file in Directory.GetFiles(Fixtures.Model("stories260K")).Where(f => Path.GetFileName(f) != "generation_config.json"))
                File.CreateSymbolicLink(Path.Combine(folder, Path.GetFileName(file)), file);
            File.WriteAllText(Path.Combine(folder, "generation_config.json"), $$"""{"bos_token_id": 1, "eos_token_id": {{eos}}}""");
            using var llm = new Llm(new EngineOptions { Model = folder, KvCacheMemoryBytes = 8L << 20 });

            // Ranked by log-probability alone, the one-token beam [EOS] wins: every longer beam adds negative log-probabilities
            // to a first token no more likely than it.
            // As in vLLM, the EOS is left out of the output unless asked for (include_stop_str_in_output).
            var byLogprob = llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 3, MaxTokens = 6, LengthPenalty = 0 })[0].Sequences;
            Assert.Equal((0, "", FinishReasons.Stop), (byLogprob[0].TokenIds.Count, byLogprob[0].Text, byLogprob[0].FinishReason));
            var included = llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 3, MaxTokens = 6, LengthPenalty = 0, IncludeStopStrInOutput = true })[0].Sequences;
            Assert.Equal([eos], included[0].TokenIds);
            Assert.Equal(llm.Engine.Tokenizer!.Decode([eos]), included[0].Text);
            Assert.Equal(byLogprob[0].CumulativeLogprob, included[0].CumulativeLogprob);
            var firstStep = llm.Generate([ids], EngineHarness.Greedy(1) with { Logprobs = 0 })[0].Outputs[0].Logprobs![0];
            Assert.Equal(firstStep.Logprob, byLogprob[0].CumulativeLogprob, 1e-4);

            // With the length penalty, a beam that stopped is scored over its length without the EOS; none continues past it.
            var byLength = llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 3, MaxTokens = 6, IncludeStopStrInOutput = true })[0].Sequences;
            foreach (var s in byLength)
            {
                bool stopped = s.FinishReason == FinishReasons.Stop;
                Assert.Equal(stopped, s.TokenIds[^1] == eos);
                Assert.DoesNotContain(eos, s.TokenIds.Take(s.TokenIds.Count - 1));
                Assert.Equal(s.CumulativeLogprob / (ids.Count + s.TokenIds.Count - (stopped ? 1 : 0)), s.Score, 1e-9);
                if (!stopped) Assert.Equal(6, s.TokenIds.Count);
            }
            // And they are the written-out search's, which sets each EOS extension aside and keeps 2 x width candidates
            // per beam: with one beam, the EOS taking the first step's top token leaves the runner-up to go on, which a
            // steep length penalty then ranks first.
            foreach (var (width, penalty) in new[] { (3, 1.0), (1, 10.0) })
            {
                var q = new BeamSearchParams { BeamWidth = width, MaxTokens = 6, LengthPenalty = penalty, IncludeStopStrInOutput = true };
                var expected = ReferenceSearch(llm.Engine, [.. ids], q, eos);
                var got = llm.BeamSearch([ids], q)[0].Sequences;
                Assert.Equal(expected.Select(b => b.Generated), got.Select(s => s.TokenIds));
                Assert.Equal(expected.Select(b => b.Score), got.Select(s => s.Score), (a, b) => Math.Abs(a - b) < 1e-3 * Math.Abs(b));
            }

            // Ignoring EOS, nothing stops: the same settings run every beam to MaxTokens.
            var ignoring = llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 3, MaxTokens = 6, IgnoreEos = true })[0].Sequences;
            Assert.All(ignoring, s => Assert.Equal((FinishReasons.Length, 6), (s.FinishReason, s.TokenIds.Count)));
            EngineHarness.AssertNoLeaks(llm.Engine);
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public async Task The_async_engine_searches_beside_a_running_request_and_changes_neither()
    {
        IReadOnlyList<BeamSearchOutput> offline;
        IReadOnlyList<int> ids, other;
        IReadOnlyList<int> otherAlone;
        var p = new BeamSearchParams { BeamWidth = 4, MaxTokens = 8, IgnoreEos = true };
        using (var llm = new Llm(EngineHarness.Options("stories260K")))
        {
            ids = llm.Engine.EncodePrompt(Texts[0]);
            other = llm.Engine.EncodePrompt(Texts[1]);
            offline = llm.BeamSearch([ids], p);
            otherAlone = llm.Generate([other], EngineHarness.Greedy(40))[0].Outputs[0].TokenIds;
        }

        using var engine = new AsyncLlmEngine(EngineHarness.Options("stories260K"));
        var running = engine.GenerateFinalAsync(other, EngineHarness.Greedy(40));
        var online = await engine.BeamSearchAsync([ids], p, [Texts[0]]);
        Assert.Equal((await running).Outputs[0].TokenIds, otherAlone);
        Assert.Equal(Texts[0], online[0].Prompt);
        Assert.Equal(offline[0].Sequences.Select(s => s.TokenIds), online[0].Sequences.Select(s => s.TokenIds));
        Assert.Equal(offline[0].Sequences.Select(s => s.Score), online[0].Sequences.Select(s => s.Score), (a, b) => Math.Abs(a - b) < 1e-4);
        await engine.InvokeAsync(EngineHarness.AssertNoLeaks);
    }

    [Fact]
    public void Invalid_settings_and_prompts_are_refused_by_name()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K", o => o.MaxLogprobs = 4));
        var ids = llm.Engine.EncodePrompt(Texts[0]);
        Assert.Equal("BeamWidth", Assert.Throws<ArgumentException>(() => llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 0 })).ParamName);
        Assert.Contains("MaxLogprobs", Assert.Throws<ArgumentException>(() => llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 3 })).Message);
        Assert.Equal("MaxTokens", Assert.Throws<ArgumentException>(() => llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 2, MaxTokens = 0 })).ParamName);
        Assert.Equal("Temperature", Assert.Throws<ArgumentException>(() => llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 2, Temperature = -1 })).ParamName);
        Assert.Equal("LengthPenalty", Assert.Throws<ArgumentException>(() => llm.BeamSearch([ids], new BeamSearchParams { BeamWidth = 2, LengthPenalty = double.NaN })).ParamName);
        var tooLong = Enumerable.Repeat(ids[1], llm.Engine.MaxModelLen).ToArray();
        var e = Assert.ThrowsAny<ArgumentException>(() => llm.BeamSearch([ids, tooLong], new BeamSearchParams { BeamWidth = 2 }));
        Assert.Contains(llm.Engine.MaxModelLen.ToString(), e.Message);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    private sealed record RefBeam(int[] Tokens, int[] Generated, double Cumulative, double Score, bool Stopped = false);

    /// <summary>
    /// The search written out plainly: each beam's next-token log-probabilities from the last row of one pass over its
    /// whole sequence (no batching, no prefix cache), softmax in double, the top 2 x width extensions by cumulative
    /// log-probability kept, an extension by <paramref name="eos"/> set aside as stopped, all ranked at the end by
    /// cumulative / length ^ penalty, a stopped beam's length without its EOS.
    /// </summary>
    private static List<RefBeam> ReferenceSearch(Core.LlmEngine engine, int[] prompt, BeamSearchParams p, int eos = -1)
    {
        var beams = new List<RefBeam> { new(prompt, [], 0, 0) };
        var stopped = new List<RefBeam>();
        for (int t = 0; t < p.MaxTokens; t++)
        {
            var next = new List<RefBeam>();
            foreach (var beam in beams)
            {
                var row = EngineHarness.AllPositionLogits(engine, beam.Tokens)[^1];
                double max = row.Max(), logSum = Math.Log(row.Sum(x => Math.Exp(x - max))) + max;
                foreach (var token in Enumerable.Range(0, row.Length).OrderByDescending(j => row[j]).Take(2 * p.BeamWidth))
                    (token == eos ? stopped : next).Add(new RefBeam([.. beam.Tokens, token], [.. beam.Generated, token], beam.Cumulative + row[token] - logSum, 0, token == eos));
            }
            beams = next.OrderByDescending(b => b.Cumulative).Take(p.BeamWidth).ToList();
        }
        return beams.Concat(stopped).Select(b => b with { Score = b.Cumulative / Math.Pow(b.Tokens.Length - (b.Stopped ? 1 : 0), p.LengthPenalty) })
            .OrderByDescending(b => b.Score).Take(p.BeamWidth).ToList();
    }
}
