namespace LocalVllm.Engine.Tests;

/// <summary>The offline API's list form (vLLM's <c>generate(prompts, [params...])</c>): each prompt with its own sampling parameters, in one batch.</summary>
public sealed class PerPromptSamplingTests
{
    [Fact]
    public void Each_prompt_runs_with_its_own_parameters_as_it_would_alone()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        string[] prompts = ["Once upon a time", "Lily and Ben went to the park", "The little dog"];
        SamplingParams[] samplings =
        [
            EngineHarness.Greedy(5),
            EngineHarness.Greedy(30) with { Stop = ["."] },
            new SamplingParams { Temperature = 0.8f, Seed = 11, MaxTokens = 12, IgnoreEos = true, N = 2 },
        ];
        var together = llm.Generate(prompts, samplings);
        for (int i = 0; i < prompts.Length; i++)
        {
            var alone = llm.Generate([prompts[i]], samplings[i])[0];
            Assert.Equal(alone.Outputs.Select(o => o.TokenIds.ToArray()), together[i].Outputs.Select(o => o.TokenIds.ToArray()));
            Assert.Equal(alone.Outputs.Select(o => o.Text), together[i].Outputs.Select(o => o.Text));
        }
        Assert.Equal(5, together[0].Outputs[0].TokenIds.Count);
        Assert.Equal(FinishReasons.Stop, together[1].Outputs[0].FinishReason);
        Assert.Equal(2, together[2].Outputs.Count);

        Assert.Contains("2 sampling parameters for 3 prompts", Assert.Throws<ArgumentException>(() => llm.Generate(prompts, samplings[..2])).Message);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }
}
