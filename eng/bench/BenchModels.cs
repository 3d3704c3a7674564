using LocalVllm.Fixtures;


namespace LocalVllm.Bench;

/// <summary>Finds or generates the benchmark models; generated ones are cached under eng/bench/.cache.</summary>
internal static class BenchModels
{
    public static string Resolve(string size)
    {
        if (Directory.Exists(size)) return size;
        switch (size)
        {
            case "stories":
                return FindShared("fixtures/stories260K");
            case "qwen3-0.6b":
            {
                var dir = Path.Combine(CacheDir(), "qwen3-0.6b-random-seed0");
                if (!File.Exists(Path.Combine(dir, "model.safetensors")))
                {
                    Console.Error.WriteLine($"Generating a random-weight Qwen3-0.6B-shaped model in {dir} (once)...");
                    RandomModel.Write(dir, RandomModelSpec.Qwen3_0_6B, seed: 0);
                }
                return dir;
            }
            default:
                throw new ArgumentException($"Unknown --size '{size}': use qwen3-0.6b, stories or a model directory.");
        }
    }

    /// <summary>A tiny random model with a byte-level tokenizer and an 8,192-token context, for the output-processing bench.</summary>
    public static string OutputsModel()
    {
        var dir = Path.Combine(CacheDir(), "outputs-bytes-l1-seed0");
        if (!File.Exists(Path.Combine(dir, "model.safetensors")))
        {
            int vocab = RandomModel.WriteByteTokenizer(dir);
            RandomModel.Write(dir, new RandomModelSpec
            {
                VocabSize = vocab + 1, HiddenSize = 16, IntermediateSize = 32, NumHiddenLayers = 1, NumAttentionHeads = 2, NumKeyValueHeads = 1,
                HeadDim = 8, MaxPositionEmbeddings = 8192, EosTokenId = 258,
            }, seed: 0);
        }
        return dir;
    }

    /// <summary>A GGUF of <paramref name="modelDir"/> in <paramref name="type"/> for llama.cpp, written once into the bench cache.</summary>
    public static string GgufFor(string modelDir, GgufType type = GgufType.F32)
    {
        var name = new DirectoryInfo(modelDir).Name;
        var path = Path.Combine(CacheDir(), $"{name}.{type.ToString().ToLowerInvariant()}.gguf");
        if (!File.Exists(path) || File.GetLastWriteTimeUtc(path) < File.GetLastWriteTimeUtc(Path.Combine(modelDir, "config.json")))
        {
            Directory.CreateDirectory(CacheDir());
            Console.Error.WriteLine($"Writing {path} for llama.cpp (once)...");
            GgufWriter.Write(modelDir, path, type);
        }
        return path;
    }

    /// <summary>
    /// <paramref name="modelDir"/> with every tensor rounded to bfloat16 (as a Hugging Face checkpoint ships it), written
    /// once into the bench cache beside the other files of the model.
    /// </summary>
    public static string Bf16Copy(string modelDir)
    {
        var source = new DirectoryInfo(modelDir);
        var dir = Path.Combine(CacheDir(), source.Name + "-bf16");
        var weights = Path.Combine(dir, "model.safetensors");
        if (File.Exists(weights) && File.GetLastWriteTimeUtc(weights) >= File.GetLastWriteTimeUtc(Path.Combine(modelDir, "config.json")))
            return dir;
        Console.Error.WriteLine($"Writing {dir}: the model rounded to bfloat16 (once)...");
        Directory.CreateDirectory(dir);
        foreach (var f in source.GetFiles().Where(f => f.Extension != ".safetensors" && f.Name != "model.safetensors.index.json"))
            f.CopyTo(Path.Combine(dir, f.Name), overwrite: true);
        var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        config["torch_dtype"] = "bfloat16";
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        var md = LocalVllm.Engine.Loading.ModelDirectory.Open(modelDir);
        using var loader = new LocalVllm.Engine.Loading.WeightLoader(md.WeightFiles);
        var tensors = loader.Keys.ToDictionary(k => k, k => loader.Read(k, TorchSharp.torch.ScalarType.BFloat16, TorchSharp.torch.CPU));
        try
        {
            SafetensorsWriter.Write(weights + ".tmp", tensors);
            File.Move(weights + ".tmp", weights, overwrite: true);
        }
        finally
        {
            foreach (var t in tensors.Values) t.Dispose();
        }
        return dir;
    }

    /// <summary>The stories260K fixture's prompt texts (its reference cases).</summary>
    public static string[] StoriesPrompts() =>
        System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(FindShared("fixtures/stories260K"), "reference.json")))!["cases"]!.AsArray()
            .Select(c => c!["text"]!.GetValue<string>()).ToArray();

    public static string FindShared(string relative)
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            var p = Path.Combine(d.FullName, "shared", relative);
            if (Directory.Exists(p) || File.Exists(p)) return p;
        }
        throw new DirectoryNotFoundException($"shared/{relative} not found beside the checkout.");
    }

    private static string CacheDir()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "Provider.sln")))
                return Path.Combine(d.FullName, "eng", "bench", ".cache");
        return Path.Combine(Path.GetTempPath(), "localvllm-bench");
    }
}
