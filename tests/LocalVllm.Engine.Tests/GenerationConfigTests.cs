using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Where sampling defaults come from (vLLM's --generation-config and --override-generation-config): the model's
/// generation_config.json, none, or another folder's, with overrides laid over them; the EOS ids stay the model's.
/// </summary>
public sealed class GenerationConfigTests
{
    [Fact]
    public void Auto_takes_the_models_sampling_settings_and_vllm_takes_none_but_both_keep_its_eos_ids()
    {
        var model = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Model("tiny-qwen3-chat"), "generation_config.json")))!;
        var eos = Fixtures.Ints(model["eos_token_id"]);
        using (var auto = new Llm(EngineHarness.Options("tiny-qwen3-chat")))
        {
            var p = auto.Engine.DefaultSamplingParams();
            Assert.Equal(((float)model["temperature"]!.GetValue<double>(), (float)model["top_p"]!.GetValue<double>(), model["top_k"]!.GetValue<int>()),
                (p.Temperature, p.TopP, p.TopK));
            Assert.Equal(eos, auto.Engine.SamplingDefaults.EosTokenIds);
        }
        using var neutral = new Llm(EngineHarness.Options("tiny-qwen3-chat", o => o.GenerationConfig = "vllm"));
        var n = neutral.Engine.DefaultSamplingParams();
        var plain = new SamplingParams();
        Assert.Equal((plain.Temperature, plain.TopP, plain.TopK, plain.MinP, plain.RepetitionPenalty, plain.MaxTokens),
            (n.Temperature, n.TopP, n.TopK, n.MinP, n.RepetitionPenalty, n.MaxTokens));
        Assert.Equal(eos, neutral.Engine.SamplingDefaults.EosTokenIds);
        Assert.Equal(eos, neutral.Engine.Directory.EosTokenIds);
    }

    [Fact]
    public void Generate_without_sampling_parameters_follows_the_overridden_defaults_to_the_reference_greedy_text()
    {
        // stories260K's own generation_config.json has no sampling settings (Generate would sample at temperature 1);
        // overridden to temperature 0 and 64 new tokens, a bare Generate is llama2.c's greedy continuation.
        var c = Fixtures.Reference("stories260K")["cases"]![0]!;
        int tokens = Fixtures.Ints(c["greedy_ids"]).Length;
        using var llm = new Llm(EngineHarness.Options("stories260K", o => o.OverrideGenerationConfig = new Dictionary<string, double>
        {
            ["temperature"] = 0, ["max_new_tokens"] = tokens,
        }));
        var output = llm.Generate([c["text"]!.GetValue<string>()])[0].Outputs[0];
        Assert.Equal(Fixtures.Ints(c["greedy_ids"]), output.TokenIds);
        Assert.Equal(c["greedy_text"]!.GetValue<string>(), output.Text);
    }

    [Fact]
    public void A_folder_gives_its_generation_config_and_overrides_win_over_it()
    {
        var folder = Directory.CreateTempSubdirectory("genconfig").FullName;
        try
        {
            File.WriteAllText(Path.Combine(folder, "generation_config.json"),
                """{"do_sample": true, "temperature": 0.3, "top_k": 7, "min_p": 0.05, "repetition_penalty": 1.1, "max_new_tokens": 5, "eos_token_id": 99}""");
            using var llm = new Llm(EngineHarness.Options("stories260K", o =>
            {
                o.GenerationConfig = folder;
                o.OverrideGenerationConfig = new Dictionary<string, double> { ["top_k"] = 3 };
            }));
            var p = llm.Engine.DefaultSamplingParams();
            Assert.Equal((0.3f, 3, 0.05f, 1.1f, 5), (p.Temperature, p.TopK, p.MinP, p.RepetitionPenalty, p.MaxTokens));
            Assert.Equal([2], llm.Engine.SamplingDefaults.EosTokenIds); // the model's EOS, not the folder's
            Assert.Equal(5, llm.Generate(["Once upon a time"], p with { IgnoreEos = true })[0].Outputs[0].TokenIds.Count);
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public void A_folder_without_generation_config_or_an_unknown_override_is_refused_by_name()
    {
        var e = Assert.Throws<ArgumentException>(() => new Llm(EngineHarness.Options("stories260K", o => o.GenerationConfig = "/nowhere/at/all")));
        Assert.Contains("GenerationConfig '/nowhere/at/all'", e.Message);
        var o2 = Assert.Throws<ArgumentException>(() => new Llm(EngineHarness.Options("stories260K", o =>
            o.OverrideGenerationConfig = new Dictionary<string, double> { ["temp"] = 0.5 })));
        Assert.Contains("'temp'", o2.Message);
        Assert.Contains("temperature", o2.Message);
        Assert.Contains("whole number", Assert.Throws<ArgumentException>(() => new Llm(EngineHarness.Options("stories260K", o =>
            o.OverrideGenerationConfig = new Dictionary<string, double> { ["top_k"] = 2.5 }))).Message);
    }
}
