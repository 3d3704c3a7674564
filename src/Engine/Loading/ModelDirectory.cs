using System.Text.Json.Nodes;
using LocalVllm.Engine.Models;

namespace LocalVllm.Engine.Loading;

/// <summary>
/// A Hugging Face model directory: config, optional generation config, weights (one file or shards) and tokenizer files.
/// </summary>
public sealed class ModelDirectory
{
    private ModelDirectory(string path, ModelConfig config, GenerationConfig generation, IReadOnlyList<string> weightFiles)
    {
        Path = path;
        Config = config;
        Generation = generation;
        WeightFiles = weightFiles;
    }

    /// <summary>The directory's full path.</summary>
    public string Path { get; }
    /// <summary>The parsed config.json.</summary>
    public ModelConfig Config { get; }
    /// <summary>The parsed generation_config.json (empty when the file is absent).</summary>
    public GenerationConfig Generation { get; }
    /// <summary>The safetensors files that hold the weights, in shard order.</summary>
    public IReadOnlyList<string> WeightFiles { get; }

    /// <summary><c>tokenizer.json</c> when present.</summary>
    public string? TokenizerJson => Existing("tokenizer.json");
    /// <summary><c>tokenizer.model</c> (SentencePiece) when present.</summary>
    public string? TokenizerModel => Existing("tokenizer.model");
    /// <summary><c>vocab.json</c> when present.</summary>
    public string? VocabJson => Existing("vocab.json");
    /// <summary><c>merges.txt</c> when present.</summary>
    public string? MergesTxt => Existing("merges.txt");
    /// <summary><c>tokenizer_config.json</c> when present.</summary>
    public string? TokenizerConfig => Existing("tokenizer_config.json");
    /// <summary><c>chat_template.jinja</c> when present.</summary>
    public string? ChatTemplateJinja => Existing("chat_template.jinja");

    /// <summary>The EOS ids: generation_config.json's list when given, else config.json's.</summary>
    public IReadOnlyList<int> EosTokenIds => Generation.EosTokenIds.Count > 0 ? Generation.EosTokenIds : Config.EosTokenIds;

    /// <summary>Opens <paramref name="path"/>, failing with a message that names the missing piece.</summary>
    public static ModelDirectory Open(string path)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        var full = System.IO.Path.GetFullPath(path);
        if (!Directory.Exists(full))
            throw new DirectoryNotFoundException($"Model directory not found: '{full}'.");
        var config = ModelConfig.Load(System.IO.Path.Combine(full, "config.json"));
        var generation = GenerationConfig.Load(System.IO.Path.Combine(full, "generation_config.json"));
        return new ModelDirectory(full, config, generation, FindWeightFiles(full));
    }

    private static IReadOnlyList<string> FindWeightFiles(string dir)
    {
        var index = System.IO.Path.Combine(dir, "model.safetensors.index.json");
        if (File.Exists(index))
        {
            var map = JsonNode.Parse(File.ReadAllText(index))?["weight_map"]?.AsObject()
                ?? throw new InvalidDataException($"'{index}' has no 'weight_map'.");
            var files = map.Select(kv => kv.Value!.GetValue<string>()).Distinct().Order(StringComparer.Ordinal)
                .Select(f => System.IO.Path.Combine(dir, f)).ToArray();
            foreach (var f in files)
                if (!File.Exists(f)) throw new FileNotFoundException($"Weight shard '{f}' named in '{index}' does not exist.", f);
            return files;
        }
        var single = System.IO.Path.Combine(dir, "model.safetensors");
        if (File.Exists(single)) return [single];
        throw new FileNotFoundException(
            $"No weights in '{dir}': expected model.safetensors or model.safetensors.index.json with its shards.", single);
    }

    private string? Existing(string name)
    {
        var p = System.IO.Path.Combine(Path, name);
        return File.Exists(p) ? p : null;
    }
}
