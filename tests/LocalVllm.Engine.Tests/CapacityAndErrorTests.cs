using System.Text.Json.Nodes;
using LocalVllm.Engine.Execution;
using Microsoft.Extensions.Logging;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// The KV cache sized as vLLM sizes it on a CPU, a context it cannot hold lowered or refused at start-up, and every
/// malformed input an error that names the file, field or value and what is allowed.
/// </summary>
public sealed class CapacityAndErrorTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("lv-cap-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private sealed class ListLogger : ILogger
    {
        public List<(LogLevel Level, string Message)> Entries { get; } = [];
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            Entries.Add((logLevel, formatter(state, exception)));
    }

    [Theory]
    [InlineData(2L << 30, 1L << 30)]      // half of what is available
    [InlineData(100L << 30, 4L << 30)]    // capped at 4 GiB, vLLM's CPU default
    [InlineData(10L << 20, 64L << 20)]    // never below 64 MiB
    public void The_default_cache_is_half_the_available_memory_capped_at_4_GiB(long available, long expected) =>
        Assert.Equal(expected, ModelRunner.DefaultKvCacheBytes(cpu: true, available));

    [Fact]
    public void The_default_cache_off_the_cpu_or_with_unknown_memory_is_256_MiB()
    {
        Assert.Equal(256L << 20, ModelRunner.DefaultKvCacheBytes(cpu: false, 100L << 30));
        Assert.Equal(256L << 20, ModelRunner.DefaultKvCacheBytes(cpu: true, null));
    }

    [Fact]
    public void Start_up_logs_the_cache_in_blocks_tokens_and_bytes()
    {
        var log = new ListLogger();
        using var engine = new Core.LlmEngine(EngineHarness.Options("stories260K"), log);
        var c = engine.Model.Config;
        long bytesPerBlock = KvCache.BytesPerBlock(c.NumHiddenLayers, 16, c.NumKeyValueHeads, c.HeadDim, TorchSharp.torch.ScalarType.Float32);
        int blocks = (int)((8L << 20) / bytesPerBlock);
        Assert.Equal(blocks, engine.Cache.NumBlocks);
        var line = Assert.Single(log.Entries, e => e.Message.StartsWith("KV cache:", StringComparison.Ordinal));
        Assert.Equal(LogLevel.Information, line.Level);
        Assert.Equal($"KV cache: {blocks} blocks = {blocks * 16} tokens, {blocks * bytesPerBlock / (double)(1 << 20):F1} MiB (set by KvCacheMemoryBytes)", line.Message);
        Assert.Equal(512, engine.MaxModelLen); // the whole context fits: nothing lowered
        Assert.DoesNotContain(log.Entries, e => e.Level == LogLevel.Warning);
    }

    [Fact]
    public void A_cache_smaller_than_the_models_context_lowers_MaxModelLen_with_a_warning_naming_the_option()
    {
        var log = new ListLogger();
        using var engine = new Core.LlmEngine(EngineHarness.Options("stories260K", o => o.NumKvBlocks = 4), log);
        Assert.Equal(64, engine.MaxModelLen);
        var warning = Assert.Single(log.Entries, e => e.Level == LogLevel.Warning);
        Assert.Contains("512", warning.Message);
        Assert.Contains("64", warning.Message);
        Assert.Contains("Raise NumKvBlocks to at least 32 blocks", warning.Message);
        var e = Assert.ThrowsAny<ArgumentException>(() => engine.AddRequest(Enumerable.Repeat(7, 70).ToArray(), EngineHarness.Greedy(2)));
        Assert.Contains("KV cache holds 64 tokens", e.Message);
        Assert.Contains("raise NumKvBlocks", e.Message);
        Assert.Contains("needs a KV cache of at least 5 blocks", e.Message); // 70 tokens + 1 to generate, 16 a block
        Assert.DoesNotContain("KvCacheMemoryBytes", e.Message);
    }

    [Fact]
    public void An_explicit_MaxModelLen_the_cache_cannot_hold_fails_start_up_saying_what_to_change()
    {
        var e = Assert.ThrowsAny<ArgumentException>(() => new Llm(EngineHarness.Options("stories260K", o => { o.NumKvBlocks = 4; o.MaxModelLen = 512; })));
        Assert.Contains("MaxModelLen = 512", e.Message);
        Assert.Contains("4 blocks = 64 tokens", e.Message);
        Assert.Contains("512 tokens need 32 blocks", e.Message);
        Assert.Contains("Raise NumKvBlocks or lower MaxModelLen", e.Message);
    }

    [Fact]
    public void A_prompt_plus_MaxTokens_over_the_context_is_refused_up_front_with_both_numbers()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        int[] prompt = [.. Enumerable.Range(1, 10)];
        var e = Assert.ThrowsAny<ArgumentException>(() => llm.Generate([prompt], EngineHarness.Greedy(600)));
        Assert.Contains("10 tokens", e.Message);
        Assert.Contains("MaxTokens (max_tokens) is 600", e.Message);
        Assert.Contains("context length of 512", e.Message);
        Assert.Contains("at most 502", e.Message);
        EngineHarness.AssertNoLeaks(llm.Engine);
        Assert.Equal(502, llm.Generate([prompt], EngineHarness.Greedy(502))[0].Outputs[0].TokenIds.Count);
    }

    [Fact]
    public void N_beyond_the_waiting_bound_is_refused_as_never_fitting_not_as_overload()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K", o => o.MaxWaitingRequests = 100));
        var e = Assert.ThrowsAny<ArgumentException>(() => llm.Generate([[1, 2, 3]], EngineHarness.Greedy(2) with { N = 5000 }));
        Assert.Contains("never", e.Message);
        Assert.Contains("MaxWaitingRequests = 100", e.Message);
    }

    private string CopyFixture(string name)
    {
        foreach (var f in Directory.GetFiles(Fixtures.Model(name))) File.Copy(f, Path.Combine(_dir, Path.GetFileName(f)));
        return _dir;
    }

    private Exception Load() => Record.Exception(() => new Llm(new EngineOptions { Model = _dir, KvCacheMemoryBytes = 1 << 20 }).Dispose())!;

    [Theory]
    [InlineData("tokenizer.json", "{ \"model\": [1, 2")]
    [InlineData("tokenizer.json", "{ \"model\": { \"type\": \"BPE\", \"vocab\": 7 }, \"decoder\": { \"type\": \"ByteLevel\" } }")]
    [InlineData("tokenizer_config.json", "not json at all")]
    [InlineData("tokenizer_config.json", "{ \"chat_template\": 42 }")]
    [InlineData("generation_config.json", "{ \"temperature\": ")]
    public void A_corrupt_tokenizer_or_generation_file_is_named(string file, string content)
    {
        CopyFixture("tiny-qwen3-chat");
        File.WriteAllText(Path.Combine(_dir, file), content);
        var e = Load();
        Assert.IsType<InvalidDataException>(e);
        Assert.Contains(_dir, e.Message);
        Assert.Contains(file, e.Message);
    }

    [Theory]
    [InlineData("generation_config.json", "do_sample", "\"yes\"", "true or false")]
    [InlineData("generation_config.json", "top_p", "-1", "a number > 0")]
    [InlineData("config.json", "num_attention_heads", "0", "an integer >= 1")]
    [InlineData("config.json", "hidden_size", "\"32\"", "an integer >= 1")]
    [InlineData("config.json", "rms_norm_eps", "\"tiny\"", "a number > 0")]
    [InlineData("config.json", "eos_token_id", "\"</s>\"", "a token id or a list of token ids")]
    public void A_field_of_the_wrong_type_or_range_is_named_with_what_is_allowed(string file, string field, string value, string allowed)
    {
        CopyFixture("tiny-qwen3-chat");
        var path = Path.Combine(_dir, file);
        var json = File.Exists(path) ? JsonNode.Parse(File.ReadAllText(path))!.AsObject() : [];
        json[field] = JsonNode.Parse(value);
        File.WriteAllText(path, json.ToJsonString());
        var e = Load();
        Assert.IsType<InvalidDataException>(e);
        Assert.Contains(file, e.Message);
        Assert.Contains($"'{field}'", e.Message);
        Assert.Contains(allowed, e.Message);
    }

    [Fact]
    public void A_lone_surrogate_in_a_prompt_is_named_with_its_position()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        var e = Assert.ThrowsAny<ArgumentException>(() => llm.Generate(["ok \ud800 then"], EngineHarness.Greedy(2)));
        Assert.Contains("lone UTF-16 surrogate U+D800 at index 3", e.Message);
        Assert.Single(llm.Generate(["ok \ud83d\ude00 then"], EngineHarness.Greedy(2))); // a proper pair is fine
    }
}
