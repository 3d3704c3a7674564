namespace LocalVllm.Engine.Tests;

/// <summary>
/// vLLM's <c>allowed_token_ids</c> and <c>include_stop_str_in_output</c> on the trained stories260K model: checked
/// against an unconstrained run's own ranking and against llama2.c's reference continuation.
/// </summary>
public sealed class AllowedTokensAndStopStringTests
{
    private static readonly System.Text.Json.Nodes.JsonNode Case = Fixtures.Reference("stories260K")["cases"]![0]!; // "Once upon a time"

    [Fact]
    public void Allowed_token_ids_restrict_every_choice_to_the_set_and_greedy_takes_the_best_of_it()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var prompt = llm.Engine.EncodePrompt(Case["text"]!.GetValue<string>());
        // The unconstrained first step's ranking: allowing its 3rd and 5th choices, greedy must take the 3rd.
        var first = llm.Generate([prompt], EngineHarness.Greedy(1) with { Logprobs = 5 })[0].Outputs[0].Logprobs![0];
        int third = first.Top[2].TokenId, fifth = first.Top[4].TokenId;
        var allowed = new[] { fifth, third };
        var greedy = llm.Generate([prompt], EngineHarness.Greedy(12) with { AllowedTokenIds = allowed })[0].Outputs[0];
        Assert.Equal(third, greedy.TokenIds[0]);
        Assert.All(greedy.TokenIds, t => Assert.Contains(t, allowed));

        // Sampled at temperature 1 with penalties and a bias that would favour another token: still only the set.
        var sampled = llm.Generate([prompt], new SamplingParams
        {
            Temperature = 1, Seed = 3, MaxTokens = 24, N = 3, RepetitionPenalty = 1.3f, FrequencyPenalty = 1,
            LogitBias = new Dictionary<int, float> { [first.Top[0].TokenId] = 50 }, AllowedTokenIds = allowed,
        })[0];
        Assert.All(sampled.Outputs.SelectMany(o => o.TokenIds), t => Assert.Contains(t, allowed));

        Assert.Contains("at least one token id", Assert.Throws<ArgumentException>(() =>
            llm.Generate([prompt], EngineHarness.Greedy(2) with { AllowedTokenIds = [] })).Message);
        Assert.Contains("outside the vocabulary", Assert.Throws<ArgumentOutOfRangeException>(() =>
            llm.Generate([prompt], EngineHarness.Greedy(2) with { AllowedTokenIds = [3, 100_000] })).Message);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    /// <summary>
    /// vLLM's bad_words: the reference continuation (", there was a little girl named Lily...") with "girl" banned keeps
    /// the same text up to where " girl" came and never writes it; with "little girl" banned, " little" may still come
    /// but not followed by " girl".
    /// </summary>
    [Theory]
    [InlineData("girl", " girl")]
    [InlineData("little girl", " little girl")]
    public void Bad_words_are_never_written_and_the_text_before_them_is_the_reference(string bad, string form)
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        string reference = Case["greedy_text"]!.GetValue<string>();
        int at = reference.IndexOf(form, StringComparison.Ordinal);
        Assert.True(at > 0);
        int tokens = Fixtures.Ints(Case["greedy_ids"]).Length;
        foreach (var sampling in new[] { EngineHarness.Greedy(tokens), new SamplingParams { Temperature = 1, Seed = 7, MaxTokens = tokens, IgnoreEos = true, N = 4 } })
        {
            var outputs = llm.Generate([Case["text"]!.GetValue<string>()], sampling with { BadWords = [bad] })[0].Outputs;
            Assert.All(outputs, o => Assert.DoesNotContain(form, o.Text));
            if (sampling.IsGreedy) Assert.StartsWith(reference[..at], outputs[0].Text);
        }
        Assert.Contains("must not be empty", Assert.Throws<ArgumentException>(() =>
            llm.Generate(["Once"], EngineHarness.Greedy(2) with { BadWords = [" "] })).Message);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void A_stop_token_ends_the_output_in_its_ids_but_not_its_text_unless_include_stop_str_in_output()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var prompt = llm.Engine.EncodePrompt(Case["text"]!.GetValue<string>());
        var greedy = Fixtures.Ints(Case["greedy_ids"]);
        int k = Enumerable.Range(2, greedy.Length - 2).First(i => !greedy[..i].Contains(greedy[i])); // its first appearance
        string before = llm.Generate([prompt], EngineHarness.Greedy(k))[0].Outputs[0].Text;
        string through = llm.Generate([prompt], EngineHarness.Greedy(k + 1))[0].Outputs[0].Text;
        foreach (bool include in new[] { false, true })
        {
            var o = llm.Generate([prompt], EngineHarness.Greedy(greedy.Length) with { StopTokenIds = [greedy[k]], IncludeStopStrInOutput = include })[0].Outputs[0];
            Assert.Equal(greedy[..(k + 1)], o.TokenIds);
            Assert.Equal(include ? through : before, o.Text);
            Assert.Equal((FinishReasons.Stop, (object)greedy[k]), (o.FinishReason, o.StopReason!));
        }
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Theory]
    [InlineData(RequestOutputKind.FinalOnly)]
    [InlineData(RequestOutputKind.Delta)]
    public void A_stop_string_ends_the_reference_text_before_it_or_after_it_with_include_stop_str_in_output(RequestOutputKind kind)
    {
        using var engine = new AsyncLlmEngine(EngineHarness.Options("stories260K"));
        string reference = Case["greedy_text"]!.GetValue<string>();
        const string stop = "little girl";
        int at = reference.IndexOf(stop, StringComparison.Ordinal);
        Assert.True(at > 0);
        var prompt = engine.Engine.EncodePrompt(Case["text"]!.GetValue<string>());
        foreach (bool include in new[] { false, true })
        {
            var sampling = EngineHarness.Greedy(Fixtures.Ints(Case["greedy_ids"]).Length) with { Stop = [stop], IncludeStopStrInOutput = include, OutputKind = kind };
            var text = new System.Text.StringBuilder();
            CompletionOutput? last = null;
            foreach (var o in engine.GenerateAsync(prompt, sampling).ToBlockingEnumerable())
            {
                last = o.Outputs[0];
                if (kind == RequestOutputKind.Delta) text.Append(last.Text);
                else text.Clear().Append(last.Text);
            }
            Assert.Equal(include ? reference[..(at + stop.Length)] : reference[..at], text.ToString());
            Assert.Equal(FinishReasons.Stop, last!.FinishReason);
            Assert.Equal(stop, last.StopReason);
        }
    }
}
