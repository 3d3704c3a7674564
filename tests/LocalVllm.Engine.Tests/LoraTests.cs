using System.Text.Json.Nodes;
using LocalVllm.TestSupport;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// LoRA adapters (PEFT format, written here with random weights) against the independent reference of each adapter
/// merged into a copy of the checkpoint (<c>W + scale x B A</c>) and run as a plain model: tokens and log-probabilities
/// alone, in mixed batches, after another adapter or the base model computed the same prompt, and under MaxLoras.
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class LoraTests : IDisposable
{
    private readonly LoraAdapters _adapters = new();

    public void Dispose() => _adapters.Dispose();

    private string Adapter(string model, int seed, int rank = 4, double alpha = 8, string[]? modules = null, bool rslora = false, Action<JsonObject>? config = null,
        Action<Dictionary<string, Tensor>>? weights = null) => _adapters.Adapter(model, seed, rank, alpha, modules, rslora, config, weights);

    private string Merged(string model, string adapter) => _adapters.Merged(model, adapter);

    private static EngineOptions Options(string model, Action<EngineOptions>? configure = null)
    {
        var o = new EngineOptions { Model = Directory.Exists(model) ? model : Fixtures.Model(model), KvCacheMemoryBytes = 8L << 20, EnableLora = true };
        configure?.Invoke(o);
        return o;
    }

    private static IReadOnlyList<int>[] Prompts(int count, int length, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => (IReadOnlyList<int>)Enumerable.Range(0, length).Select(_ => rng.Next(3, 512)).ToArray()).ToArray();
    }

    private static readonly SamplingParams Greedy = EngineHarness.Greedy(12) with { Logprobs = 3 };

    /// <summary>
    /// Same tokens, and log-probabilities within 1e-3: the merged checkpoint rounds W + scale x B A to float32 once, the
    /// adapter adds its update after the base product, and on stories260K's five trained layers that moves the last
    /// digits (up to about 1e-4); a module left out or a wrong scale moves them by far more and changes the tokens.
    /// </summary>
    private static void AssertSame(RequestOutput expected, RequestOutput actual, string what)
    {
        var (e, a) = (expected.Outputs[0], actual.Outputs[0]);
        Assert.True(e.TokenIds.SequenceEqual(a.TokenIds), $"{what}: tokens [{string.Join(", ", a.TokenIds)}], expected [{string.Join(", ", e.TokenIds)}]");
        for (int i = 0; i < e.TokenIds.Count; i++)
            Assert.True(Math.Abs(e.Logprobs![i].Logprob - a.Logprobs![i].Logprob) < 1e-3, $"{what}: position {i} log-probability {a.Logprobs![i].Logprob} vs {e.Logprobs![i].Logprob}");
    }

    [Theory]
    [InlineData("tiny-llama", false)]
    [InlineData("stories260K", false)]
    [InlineData("stories260K", true)]
    public void An_adapter_gives_the_merged_models_tokens_and_log_probabilities(string model, bool rslora)
    {
        var adapter = Adapter(model, seed: 1, rslora: rslora);
        var prompts = Prompts(3, 21, seed: 5);
        IReadOnlyList<RequestOutput> expected;
        using (var merged = new Llm(Options(Merged(model, adapter)))) expected = merged.Generate(prompts, Greedy);

        using var llm = new Llm(Options(model));
        var lora = new LoraRequest("story-style", 1, adapter);
        var got = llm.Generate(prompts, Greedy, lora);
        var plain = llm.Generate(prompts, Greedy);
        for (int i = 0; i < prompts.Length; i++)
        {
            AssertSame(expected[i], got[i], $"prompt {i}");
            Assert.NotEqual(plain[i].Outputs[0].TokenIds, got[i].Outputs[0].TokenIds); // the adapter changes what the model says
        }
        Assert.Equal([lora], llm.Engine.ListLoras());
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Base_and_two_adapters_in_one_batch_on_one_prompt_each_give_their_own_models_output()
    {
        const string model = "stories260K";
        string a = Adapter(model, seed: 2), b = Adapter(model, seed: 3, rank: 8, alpha: 4, modules: ["q_proj", "v_proj", "down_proj"]);
        var prompt = Prompts(1, 40, seed: 7)[0]; // two full blocks and a part: what the prefix cache would share
        RequestOutput Alone(string dir) { using var m = new Llm(Options(dir)); return m.Generate([prompt], Greedy)[0]; }
        var (plain, mergedA, mergedB) = (Alone(Fixtures.Model(model)), Alone(Merged(model, a)), Alone(Merged(model, b)));
        var (loraA, loraB) = (new LoraRequest("a", 1, a), new LoraRequest("b", 2, b));

        using var llm = new Llm(Options(model, o => o.MaxLoras = 2));
        // The base model computes the prompt first, so its blocks are cached; then each adapter on the same prompt.
        AssertSame(plain, llm.Generate([prompt], Greedy)[0], "base");
        AssertSame(mergedA, llm.Generate([prompt], Greedy, loraA)[0], "adapter a after the base model cached the prompt");
        AssertSame(mergedB, llm.Generate([prompt], Greedy, loraB)[0], "adapter b after a");
        var cachedA = llm.Generate([prompt], Greedy, loraA)[0];
        Assert.Equal(32, cachedA.NumCachedTokens); // an adapter's own blocks are shared between its requests
        AssertSame(mergedA, cachedA, "adapter a again, from its cached blocks");

        var batch = llm.Generate(Enumerable.Repeat(prompt, 6).ToArray(), Enumerable.Repeat(Greedy, 6).ToArray(), [null, loraA, loraB, loraB, null, loraA]);
        var expected = new[] { plain, mergedA, mergedB, mergedB, plain, mergedA };
        for (int i = 0; i < 6; i++) AssertSame(expected[i], batch[i], $"batch row {i}");
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Under_max_loras_one_adapters_take_turns_and_none_is_wrong()
    {
        const string model = "stories260K";
        string a = Adapter(model, seed: 4), b = Adapter(model, seed: 5);
        var prompts = Prompts(4, 20, seed: 9);
        IReadOnlyList<RequestOutput> Merged(string adapter) { using var m = new Llm(Options(this.Merged(model, adapter))); return m.Generate(prompts, Greedy); }
        var (expectA, expectB) = (Merged(a), Merged(b));
        var (loraA, loraB) = (new LoraRequest("a", 1, a), new LoraRequest("b", 2, b));

        using var llm = new Llm(Options(model, o => o.MaxLoras = 1));
        var engine = llm.Engine;
        var ids = prompts.Select((p, i) => engine.AddRequest(p, Greedy, lora: i % 2 == 0 ? loraA : loraB)).ToArray();
        var outputs = new Dictionary<string, RequestOutput>();
        int steps = 0;
        while (engine.HasUnfinishedRequests)
        {
            foreach (var o in engine.Step()) if (o.Finished) outputs[o.RequestId] = o;
            var running = engine.Scheduler.Unfinished.Where(s => s.Status == Core.SequenceStatus.Running).Select(s => s.Lora).Distinct().Count();
            Assert.True(running <= 1, $"step {steps}: {running} adapters running at once");
            steps++;
        }
        for (int i = 0; i < prompts.Length; i++) AssertSame(i % 2 == 0 ? expectA[i] : expectB[i], outputs[ids[i]], $"request {i}");
        EngineHarness.AssertNoLeaks(engine);

        // Both stayed loaded while requests used them, beyond MaxCpuLoras (default: MaxLoras = 1); the next adapter
        // loaded drops the idle ones, and one dropped is read again from its folder when asked for.
        Assert.Equal([loraA, loraB], engine.ListLoras());
        var loraC = new LoraRequest("c", 3, Adapter(model, seed: 15));
        llm.Generate([prompts[0]], Greedy, loraC);
        Assert.Equal([loraC], engine.ListLoras());
        AssertSame(expectA[0], llm.Generate([prompts[0]], Greedy, loraA)[0], "adapter a read again");
        Assert.Equal([loraA], engine.ListLoras());
        Assert.True(engine.RemoveLora(1));
        Assert.False(engine.RemoveLora(1));
        Assert.Empty(engine.ListLoras());
    }

    [Fact]
    public void Bad_adapters_are_refused_naming_the_problem_and_the_engine_runs_on()
    {
        const string model = "stories260K";
        using var llm = new Llm(Options(model, o => o.MaxLoraRank = 8));
        var prompt = Prompts(1, 10, seed: 1);
        string good = Adapter(model, seed: 6);
        string Refused(LoraRequest lora) => Assert.ThrowsAny<Exception>(() => llm.Generate(prompt, Greedy, lora)).Message;

        Assert.Contains("not found", Refused(new LoraRequest("gone", 1, "/nowhere/adapter")));
        Assert.Contains("MaxLoraRank 8", Refused(new LoraRequest("wide", 2, Adapter(model, seed: 7, rank: 16))));
        Assert.Contains("trained for another model", Refused(new LoraRequest("other", 3, Adapter("tiny-llama", seed: 8))));
        Assert.Contains("embed_tokens", Refused(new LoraRequest("embed", 4, Adapter(model, seed: 9, modules: ["q_proj"],
            weights: w => w["base_model.model.model.embed_tokens.lora_A.weight"] = zeros(4, 512)))));
        Assert.Contains("lora_B missing", Refused(new LoraRequest("half", 5, Adapter(model, seed: 10, modules: ["q_proj"],
            weights: w => w.Remove("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")))));
        Assert.Contains("DoRA", Refused(new LoraRequest("dora", 6, Adapter(model, seed: 11, config: c => c["use_dora"] = true))));
        Assert.Contains("modules_to_save", Refused(new LoraRequest("saved", 7, Adapter(model, seed: 12, config: c => c["modules_to_save"] = new JsonArray("lm_head")))));
        llm.Generate(prompt, Greedy, new LoraRequest("good", 8, good));
        Assert.Contains("already loaded as 'good'", Refused(new LoraRequest("impostor", 8, Adapter(model, seed: 13))));
        Assert.Equal(12, llm.Generate(prompt, Greedy)[0].Outputs[0].TokenIds.Count); // the base model still serves
        EngineHarness.AssertNoLeaks(llm.Engine);

        using var off = new Llm(Options(model, o => o.EnableLora = false));
        Assert.Contains("EnableLora", Assert.Throws<ArgumentException>(() => off.Generate(prompt, Greedy, new LoraRequest("good", 1, good))).Message);
        EngineHarness.AssertNoLeaks(off.Engine);
    }

    /// <summary>
    /// The other ways a request runs go through the adapter too: beam search (one-token requests per beam) and
    /// speculative decoding (draft rows computed under the sequence's adapter) give the merged model's results.
    /// </summary>
    [Fact]
    public void Beam_search_and_speculative_decoding_under_an_adapter_give_the_merged_models_results()
    {
        const string model = "stories260K";
        string a = Adapter(model, seed: 16);
        var prompts = Prompts(2, 24, seed: 12);
        var beam = new BeamSearchParams { BeamWidth = 3, MaxTokens = 6, IgnoreEos = true };
        var longer = EngineHarness.Greedy(40);
        IReadOnlyList<BeamSearchOutput> expectedBeams;
        IReadOnlyList<RequestOutput> expectedLong;
        using (var merged = new Llm(Options(Merged(model, a))))
        {
            expectedBeams = merged.BeamSearch(prompts, beam);
            expectedLong = merged.Generate(prompts, longer);
        }
        var lora = new LoraRequest("a", 1, a);
        using var llm = new Llm(Options(model, o => o.Speculative = new SpeculativeConfig { NumSpeculativeTokens = 4 }));
        var beams = llm.BeamSearch(prompts, beam, lora);
        for (int i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(expectedBeams[i].Sequences.Select(x => x.TokenIds), beams[i].Sequences.Select(x => x.TokenIds));
            Assert.Equal(expectedBeams[i].Sequences.Select(x => x.Score), beams[i].Sequences.Select(x => x.Score), (x, y) => Math.Abs(x - y) < 1e-3);
        }
        var before = llm.Engine.GetStats();
        var speculated = llm.Generate(prompts, longer, lora);
        Assert.True(llm.Engine.GetStats().SpecDraftTokens > before.SpecDraftTokens, "no drafts were proposed: the test would not cover draft rows");
        for (int i = 0; i < prompts.Length; i++) Assert.Equal(expectedLong[i].Outputs[0].TokenIds, speculated[i].Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    /// <summary>
    /// An adapter named by a hub repository id (as vLLM takes them) is downloaded into the model cache (only its config
    /// and weights) and serves its merged model's output; a model repository named as an adapter is refused by name.
    /// </summary>
    [Fact]
    public void An_adapter_named_by_a_hub_id_is_downloaded_and_served()
    {
        const string model = "stories260K";
        string a = Adapter(model, seed: 17);
        var prompts = Prompts(2, 20, seed: 13);
        IReadOnlyList<RequestOutput> expected;
        using (var merged = new Llm(Options(Merged(model, a)))) expected = merged.Generate(prompts, Greedy);

        var cache = Directory.CreateTempSubdirectory("lora-hub").FullName;
        try
        {
            using var hub = new FakeHub(a, "someone/story-style");
            using var llm = new Llm(Options(model, o => o.Hub = new Loading.Hub.HubOptions { CacheDir = cache, Endpoint = hub.Endpoint, ConsoleProgress = false }));
            var got = llm.Generate(prompts, Greedy, new LoraRequest("style", 1, "someone/story-style"));
            for (int i = 0; i < prompts.Length; i++) AssertSame(expected[i], got[i], $"prompt {i}");
            var snapshot = Path.Combine(cache, "models--someone--story-style", "snapshots", FakeHub.Commit);
            Assert.Equal(["adapter_config.json", "adapter_model.safetensors"], Directory.GetFiles(snapshot).Select(Path.GetFileName).Order());

            using var modelHub = new FakeHub(Fixtures.Model(model), "someone/not-an-adapter");
            using var other = new Llm(Options(model, o => o.Hub = new Loading.Hub.HubOptions { CacheDir = cache, Endpoint = modelHub.Endpoint, ConsoleProgress = false }));
            var e = Assert.ThrowsAny<Exception>(() => other.Generate(prompts, Greedy, new LoraRequest("wrong", 1, "someone/not-an-adapter")));
            Assert.Contains("has no adapter_config.json: it is not a PEFT adapter repository", e.Message);
            EngineHarness.AssertNoLeaks(llm.Engine);
        }
        finally
        {
            Directory.Delete(cache, recursive: true);
        }
    }

    /// <summary>
    /// The decode kernel against libtorch's products, at sizes that are no multiple of any vector width: each run's rows
    /// get their own adapter's update, the rows between runs are left as they were.
    /// </summary>
    [Theory]
    [InlineData(37, 5, 43)]
    [InlineData(64, 16, 96)]
    [InlineData(3, 1, 1)]
    public void The_decode_kernel_adds_each_runs_update_as_libtorch_computes_it(int inDim, int rank, int outDim)
    {
        var gen = new Generator().manual_seed(inDim * 1000 + rank);
        using var x = randn([9, inDim], generator: gen);
        using var output = randn([9, outDim], generator: gen);
        using var at1 = randn([inDim, rank], generator: gen);
        using var bt1 = randn([rank, outDim], generator: gen);
        using var at2 = randn([inDim, rank], generator: gen);
        using var bt2 = randn([rank, outDim], generator: gen);
        using var expected = output.clone();
        expected.narrow(0, 1, 3).add_(x.narrow(0, 1, 3).mm(at1).mm(bt1));
        expected.narrow(0, 6, 2).add_(x.narrow(0, 6, 2).mm(at2).mm(bt2));

        Assert.True(Kernels.Cpu.LoraKernel.Supports(x, at1, bt1, output, 3));
        Kernels.Cpu.LoraKernel.AddUpdates(x, output, [(1, 3, at1, bt1), (6, 2, at2, bt2)]);
        Assert.True(output.allclose(expected, rtol: 1e-5, atol: 1e-4), $"max difference {(output - expected).abs().max().item<float>()}");
        Assert.False(Kernels.Cpu.LoraKernel.Supports(x, at1, bt1, output, Kernels.Cpu.LoraKernel.MaxRows + 1)); // prefill goes to libtorch
        using var bf16 = x.to(ScalarType.BFloat16);
        Assert.False(Kernels.Cpu.LoraKernel.Supports(bf16, at1, bt1, output, 3));
    }

    [Fact]
    public async Task The_async_engine_serves_an_adapter_beside_the_base_model()
    {
        const string model = "stories260K";
        string a = Adapter(model, seed: 14);
        var prompt = Prompts(1, 30, seed: 3)[0];
        RequestOutput expected, plain;
        using (var m = new Llm(Options(Merged(model, a)))) expected = m.Generate([prompt], Greedy)[0];
        using (var m = new Llm(Options(model))) plain = m.Generate([prompt], Greedy)[0];

        using var engine = new AsyncLlmEngine(Options(model));
        var withAdapter = engine.GenerateFinalAsync(prompt, Greedy, lora: new LoraRequest("a", 1, a));
        var without = engine.GenerateFinalAsync(prompt, Greedy);
        AssertSame(expected, await withAdapter, "async, adapter");
        AssertSame(plain, await without, "async, base");
        await Assert.ThrowsAnyAsync<Exception>(() => engine.GenerateFinalAsync(prompt, Greedy, lora: new LoraRequest("gone", 2, "/nowhere")));
        await engine.InvokeAsync(EngineHarness.AssertNoLeaks);
    }
}
