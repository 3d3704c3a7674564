#if FIXTURES_WRITER_ALIASED
extern alias fixtureswriter;
using SafetensorsWriter = fixtureswriter::LocalVllm.Fixtures.SafetensorsWriter;
#else
using SafetensorsWriter = LocalVllm.Fixtures.SafetensorsWriter;
#endif
using System.Text.Json.Nodes;
using LocalVllm.Engine.Loading;
using FixtureFiles = LocalVllm.Engine.Tests.Fixtures;
using static TorchSharp.torch;

namespace LocalVllm.TestSupport;

/// <summary>
/// PEFT LoRA adapters with random weights for a fixture model, and the independent reference for each: a copy of the
/// checkpoint with the adapter merged into its weights (<c>W + scale x B A</c>, in float64, stored as float32). The
/// folders live in the temp directory until <see cref="Dispose"/>.
/// </summary>
internal sealed class LoraAdapters : IDisposable
{
    private static readonly string[] AllModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    private readonly List<string> _folders = [];

    public void Dispose()
    {
        foreach (var f in _folders) Directory.Delete(f, recursive: true);
    }

    private string Folder(string name)
    {
        var f = Directory.CreateTempSubdirectory(name).FullName;
        _folders.Add(f);
        return f;
    }

    private static string Block(string module) => module is "gate_proj" or "up_proj" or "down_proj" ? "mlp" : "self_attn";

    private static (long Out, long In) ShapeOf(SafetensorsFile model, int layer, string module) =>
        model.Entries[$"model.layers.{layer}.{Block(module)}.{module}.weight"].Shape is [var o, var i] ? (o, i) : throw new InvalidDataException(module);

    /// <summary>A PEFT adapter folder for <paramref name="model"/> with random A and B on <paramref name="modules"/> of every layer.</summary>
    public string Adapter(string model, int seed, int rank = 4, double alpha = 8, string[]? modules = null, bool rslora = false, Action<JsonObject>? config = null,
        Action<Dictionary<string, Tensor>>? weights = null)
    {
        modules ??= AllModules;
        var folder = Folder($"lora-{seed}");
        var cfg = new JsonObject
        {
            ["peft_type"] = "LORA", ["r"] = rank, ["lora_alpha"] = alpha, ["target_modules"] = new JsonArray(modules.Select(m => (JsonNode?)m).ToArray()),
            ["bias"] = "none", ["fan_in_fan_out"] = false, ["use_rslora"] = rslora, ["modules_to_save"] = null,
        };
        config?.Invoke(cfg);
        File.WriteAllText(Path.Combine(folder, "adapter_config.json"), cfg.ToJsonString());
        using var file = SafetensorsFile.Open(Path.Combine(FixtureFiles.Model(model), "model.safetensors"));
        int layers = JsonNode.Parse(File.ReadAllText(Path.Combine(FixtureFiles.Model(model), "config.json")))!["num_hidden_layers"]!.GetValue<int>();
        var gen = new Generator().manual_seed(seed);
        var tensors = new Dictionary<string, Tensor>();
        for (int l = 0; l < layers; l++)
            foreach (var m in modules)
            {
                var (o, i) = ShapeOf(file, l, m);
                string prefix = $"base_model.model.model.layers.{l}.{Block(m)}.{m}";
                tensors[$"{prefix}.lora_A.weight"] = randn([rank, i], generator: gen) * 0.15;
                tensors[$"{prefix}.lora_B.weight"] = randn([o, rank], generator: gen) * 0.15;
            }
        weights?.Invoke(tensors);
        SafetensorsWriter.Write(Path.Combine(folder, "adapter_model.safetensors"), tensors);
        foreach (var t in tensors.Values) t.Dispose();
        return folder;
    }

    /// <summary>A copy of <paramref name="model"/> with the adapter merged into its weights: W + scale x B A.</summary>
    public string Merged(string model, string adapter)
    {
        var folder = Folder("merged");
        foreach (var f in Directory.GetFiles(FixtureFiles.Model(model)).Where(f => Path.GetFileName(f) != "model.safetensors"))
            File.CreateSymbolicLink(Path.Combine(folder, Path.GetFileName(f)), f);
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(adapter, "adapter_config.json")))!;
        double r = cfg["r"]!.GetValue<int>(), alpha = cfg["lora_alpha"]!.GetValue<double>();
        double scale = cfg["use_rslora"]!.GetValue<bool>() ? alpha / Math.Sqrt(r) : alpha / r;
        using var baseFile = SafetensorsFile.Open(Path.Combine(FixtureFiles.Model(model), "model.safetensors"));
        using var loraFile = SafetensorsFile.Open(Path.Combine(adapter, "adapter_model.safetensors"));
        var tensors = baseFile.Entries.Keys.ToDictionary(k => k, k => baseFile.Read(k, ScalarType.Float32, CPU));
        foreach (var key in loraFile.Entries.Keys.Where(k => k.EndsWith(".lora_A.weight")))
        {
            var target = key.Replace("base_model.model.", "").Replace(".lora_A.weight", ".weight");
            using var a = loraFile.Read(key, ScalarType.Float32, CPU);
            using var b = loraFile.Read(key.Replace("lora_A", "lora_B"), ScalarType.Float32, CPU);
            var merged = (tensors[target].to(ScalarType.Float64) + b.to(ScalarType.Float64).mm(a.to(ScalarType.Float64)) * scale).to(ScalarType.Float32);
            tensors[target].Dispose();
            tensors[target] = merged;
        }
        SafetensorsWriter.Write(Path.Combine(folder, "model.safetensors"), tensors);
        foreach (var t in tensors.Values) t.Dispose();
        return folder;
    }

}
