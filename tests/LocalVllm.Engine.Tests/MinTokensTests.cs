namespace LocalVllm.Engine.Tests;

/// <summary>min_tokens as vLLM applies it: EOS and the stop token ids cannot be sampled until that many tokens are out.</summary>
[Trait("Category", "Fixtures")]
public sealed class MinTokensTests
{
    [Fact]
    public void A_stop_token_is_masked_until_min_tokens_and_ends_the_output_after()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        string[] prompt = ["Once upon a time"];
        var plain = llm.Generate(prompt, EngineHarness.Greedy(200))[0].Outputs[0].TokenIds;
        int stop = plain[3]; // a token the story has early (its first occurrence is at most position 3)
        int first = plain.ToList().IndexOf(stop);
        var stopped = llm.Generate(prompt, EngineHarness.Greedy(200) with { StopTokenIds = [stop] })[0].Outputs[0];
        Assert.Equal(first + 1, stopped.TokenIds.Count); // without min_tokens it ends there
        int min = first + 12;

        // Up to min_tokens, the greedy choice among all tokens but the stop token: the same as a run allowed every other token.
        var masked = llm.Generate(prompt, EngineHarness.Greedy(min) with { StopTokenIds = [stop], MinTokens = min })[0].Outputs[0];
        var others = Enumerable.Range(0, llm.Engine.Model.Config.VocabSize).Where(t => t != stop).ToArray();
        var biased = llm.Generate(prompt, EngineHarness.Greedy(min) with { AllowedTokenIds = others })[0].Outputs[0];
        Assert.Equal(biased.TokenIds, masked.TokenIds);
        Assert.DoesNotContain(stop, masked.TokenIds);
        Assert.Equal((min, FinishReasons.Length), (masked.TokenIds.Count, masked.FinishReason));

        // After min_tokens the stop token may come: the run goes on from the same tokens and ends at it.
        var after = llm.Generate(prompt, EngineHarness.Greedy(200) with { StopTokenIds = [stop], MinTokens = min })[0].Outputs[0];
        Assert.Equal(masked.TokenIds, after.TokenIds.Take(min));
        Assert.Equal((FinishReasons.Stop, (object)stop), (after.FinishReason, after.StopReason!));
        Assert.Equal(stop, after.TokenIds[^1]);
        Assert.DoesNotContain(stop, after.TokenIds.SkipLast(1));
        EngineHarness.AssertNoLeaks(llm.Engine);
    }
}
