using System.Text.Json.Nodes;
using LocalVllm.Engine.Loading;
using LocalVllm.Fixtures;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>Bad model directories and bad prompts get errors that name the file or value at fault.</summary>
public sealed class ModelLoadingErrorTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("lv-bad-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string CopyFixture(string name)
    {
        foreach (var f in Directory.GetFiles(Fixtures.Model(name)))
            File.Copy(f, Path.Combine(_dir, Path.GetFileName(f)));
        return _dir;
    }

    private static Exception Load(string dir) =>
        Record.Exception(() => new Llm(new EngineOptions { Model = dir, KvCacheMemoryBytes = 1 << 20 }).Dispose())!;

    [Fact]
    public void Missing_config_json_names_the_file()
    {
        var e = Load(_dir);
        Assert.IsType<FileNotFoundException>(e);
        Assert.Contains("config.json", e.Message);
    }

    [Fact]
    public void Missing_directory_names_the_path()
    {
        var e = Load(Path.Combine(_dir, "nope"));
        Assert.IsType<DirectoryNotFoundException>(e);
        Assert.Contains("nope", e.Message);
    }

    [Fact]
    public void Unknown_architecture_is_named_with_the_supported_list()
    {
        CopyFixture("tiny-llama");
        var path = Path.Combine(_dir, "config.json");
        var json = JsonNode.Parse(File.ReadAllText(path))!;
        json["architectures"] = new JsonArray("GPT2LMHeadModel");
        File.WriteAllText(path, json.ToJsonString());
        var e = Load(_dir);
        Assert.IsType<NotSupportedException>(e);
        Assert.Contains("GPT2LMHeadModel", e.Message);
        Assert.Contains("Qwen3ForCausalLM", e.Message);
    }

    [Fact]
    public void Unknown_rope_type_is_named()
    {
        CopyFixture("tiny-llama");
        var path = Path.Combine(_dir, "config.json");
        var json = JsonNode.Parse(File.ReadAllText(path))!;
        json["rope_scaling"]!["rope_type"] = "yarn-ish";
        File.WriteAllText(path, json.ToJsonString());
        var e = Load(_dir);
        Assert.IsType<NotSupportedException>(e);
        Assert.Contains("yarn-ish", e.Message);
    }

    [Fact]
    public void Truncated_safetensors_names_the_file()
    {
        CopyFixture("tiny-llama");
        var path = Path.Combine(_dir, "model.safetensors");
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length / 2)]);
        var e = Load(_dir);
        Assert.IsType<InvalidDataException>(e);
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains("truncated", e.Message);
    }

    [Fact]
    public void Missing_and_misshapen_tensors_are_named_with_both_shapes()
    {
        CopyFixture("tiny-llama");
        var path = Path.Combine(_dir, "model.safetensors");
        var tensors = new Dictionary<string, Tensor>();
        using (var file = SafetensorsFile.Open(path))
            foreach (var name in file.Entries.Keys)
                tensors[name] = file.Read(name, ScalarType.Float32, CPU);
        tensors.Remove("model.layers.1.mlp.up_proj.weight", out var removed);
        removed!.Dispose();
        SafetensorsWriter.Write(path, tensors);
        var e = Load(_dir);
        Assert.IsType<InvalidDataException>(e);
        Assert.Contains("model.layers.1.mlp.up_proj.weight", e.Message);

        tensors["model.layers.1.mlp.up_proj.weight"] = zeros(160, 63);
        SafetensorsWriter.Write(path, tensors);
        e = Load(_dir);
        Assert.Contains("model.layers.1.mlp.up_proj.weight", e.Message);
        Assert.Contains("[160, 63]", e.Message);
        Assert.Contains("[160, 64]", e.Message);
        foreach (var t in tensors.Values) t.Dispose();
    }

    [Fact]
    public void Token_ids_outside_the_vocabulary_and_overlong_prompts_are_rejected_and_the_engine_keeps_serving()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var e = Assert.ThrowsAny<ArgumentException>(() => llm.Generate([[1, 5, 512]], EngineHarness.Greedy(4)));
        Assert.Contains("512", e.Message);
        Assert.Contains("vocabulary", e.Message);

        var overlong = Enumerable.Repeat(5, 600).ToArray();
        e = Assert.ThrowsAny<ArgumentException>(() => llm.Generate([overlong], EngineHarness.Greedy(4)));
        Assert.Contains("600", e.Message);
        Assert.Contains("512", e.Message);

        var empty = Assert.ThrowsAny<ArgumentException>(() => llm.Generate([Array.Empty<int>()], EngineHarness.Greedy(4)));
        Assert.Contains("empty", empty.Message);

        // A bad request in a batch rejects the batch without leaving the good ones queued.
        Assert.ThrowsAny<ArgumentException>(() => llm.Generate([[1, 2, 3], [1, 99999]], EngineHarness.Greedy(4)));
        EngineHarness.AssertNoLeaks(llm.Engine);
        Assert.Equal(4, llm.Generate([[1, 2, 3]], EngineHarness.Greedy(4))[0].Outputs[0].TokenIds.Count);
    }

    [Fact]
    public void Prompt_longer_than_the_whole_kv_cache_is_rejected_with_the_limit()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama", o => { o.NumKvBlocks = 4; o.BlockSize = 16; }));
        var e = Assert.ThrowsAny<ArgumentException>(() => llm.Generate([Enumerable.Repeat(7, 100).ToArray()], EngineHarness.Greedy(2)));
        Assert.Contains("64 tokens", e.Message);
        Assert.Equal(2, llm.Generate([[1, 2, 3]], EngineHarness.Greedy(2))[0].Outputs[0].TokenIds.Count);
    }

    [Theory]
    [InlineData("MaxTokens", 0)]
    [InlineData("Temperature", -0.5)]
    [InlineData("TopP", 0)]
    [InlineData("TopP", 1.5)]
    [InlineData("MinP", 2)]
    public void Invalid_sampling_options_name_the_field(string field, double value)
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var p = field switch
        {
            "MaxTokens" => new SamplingParams { MaxTokens = (int)value },
            "Temperature" => new SamplingParams { Temperature = (float)value },
            "TopP" => new SamplingParams { TopP = (float)value },
            _ => new SamplingParams { MinP = (float)value },
        };
        var e = Assert.ThrowsAny<ArgumentException>(() => llm.Generate([[1, 2]], p));
        Assert.Contains(field, e.Message);
        Assert.Single(llm.Generate([[1, 2]], EngineHarness.Greedy(1)));
    }
}
