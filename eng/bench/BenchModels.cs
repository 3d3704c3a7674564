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

    /// <summary>An F32 GGUF of <paramref name="modelDir"/> for llama.cpp, written once into the bench cache.</summary>
    public static string GgufFor(string modelDir)
    {
        var name = new DirectoryInfo(modelDir).Name;
        var path = Path.Combine(CacheDir(), name + ".f32.gguf");
        if (!File.Exists(path) || File.GetLastWriteTimeUtc(path) < File.GetLastWriteTimeUtc(Path.Combine(modelDir, "config.json")))
        {
            Directory.CreateDirectory(CacheDir());
            Console.Error.WriteLine($"Writing {path} for llama.cpp (once)...");
            GgufWriter.Write(modelDir, path);
        }
        return path;
    }

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
