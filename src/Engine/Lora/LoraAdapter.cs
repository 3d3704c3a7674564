using System.IO.Hashing;
using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LocalVllm.Engine.Loading;
using LocalVllm.Engine.Models;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Lora;

/// <summary>
/// A PEFT LoRA adapter loaded for one model: for each layer and each of the model's four fused projections (q/k/v,
/// o, gate/up, down), the low-rank pairs that add <c>scale x B (A x)</c> to a slice of that projection's output, with
/// the scale (<c>lora_alpha / r</c>, or <c>/ sqrt(r)</c> with rsLoRA) folded into B. Weights in the model's dtype.
/// </summary>
internal sealed partial class LoraAdapter : IDisposable
{
    /// <summary>
    /// A fused projection's update as one low-rank pair: the adapted modules' A matrices stacked (transposed, [in, R])
    /// and their B matrices placed block-diagonally over the projection's output columns ([R, out], zeros where a
    /// module is not adapted or belongs to another module's rank), so that the update is two products whatever modules
    /// the adapter covers.
    /// </summary>
    internal sealed record Pair(Tensor AT, Tensor BT);

    /// <summary>The fused projections, in the order of <see cref="Pairs"/>' second index.</summary>
    internal enum Projection { Qkv, O, GateUp, Down }

    private LoraAdapter(LoraRequest request, int rank, Pair?[][] pairs)
    {
        Request = request;
        Rank = rank;
        Pairs = pairs;
        // Prefix-cache salt: blocks computed under this adapter never match another adapter's (or the base model's).
        PrefixSalt = XxHash64.HashToUInt64(Encoding.UTF8.GetBytes($"lora/{request.Id}/{request.Name}"));
    }

    public LoraRequest Request { get; }
    public int Rank { get; }
    public ulong PrefixSalt { get; }
    /// <summary>[layer][projection] -> that projection's update, or null where the adapter leaves it alone.</summary>
    public Pair?[][] Pairs { get; }
    /// <summary>The steps since this adapter last ran (for choosing which loaded adapter to drop).</summary>
    public long LastUsedStep { get; set; }

    private static readonly string[] Modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    [GeneratedRegex(@"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)(?:\.default)?\.weight$")]
    private static partial Regex KeyPattern();

    /// <summary>
    /// Loads <paramref name="request"/>'s adapter for a model of <paramref name="config"/>; throws
    /// <see cref="ArgumentException"/> (or a file exception) naming what does not fit: a missing file, a rank above
    /// <paramref name="maxRank"/>, a module this engine does not adapt, a shape that is not the model's.
    /// </summary>
    public static LoraAdapter Load(LoraRequest request, ModelConfig config, ScalarType dtype, Device device, int maxRank, string? folder = null)
    {
        folder ??= request.Path;
        ArgumentNullException.ThrowIfNull(request);
        if (request.Id < 1) throw new ArgumentException($"LoRA adapter '{request.Name}': Id must be a positive number, got {request.Id}.", nameof(request));
        if (string.IsNullOrWhiteSpace(request.Name)) throw new ArgumentException("A LoRA adapter needs a name.", nameof(request));
        var configPath = System.IO.Path.Combine(folder, "adapter_config.json");
        var weightsPath = System.IO.Path.Combine(folder, "adapter_model.safetensors");
        if (!Directory.Exists(folder)) throw new DirectoryNotFoundException($"LoRA adapter '{request.Name}': folder '{folder}' not found.");
        if (!File.Exists(configPath)) throw new FileNotFoundException($"LoRA adapter '{request.Name}': '{configPath}' not found (a PEFT adapter folder holds adapter_config.json).", configPath);
        if (!File.Exists(weightsPath))
            throw new FileNotFoundException($"LoRA adapter '{request.Name}': '{weightsPath}' not found" +
                (File.Exists(System.IO.Path.Combine(folder, "adapter_model.bin")) ? " (only adapter_model.bin is there: convert it to safetensors)." : "."), weightsPath);

        var cfg = JsonNode.Parse(File.ReadAllText(configPath)) as JsonObject
                  ?? throw new InvalidDataException($"LoRA adapter '{request.Name}': adapter_config.json is not a JSON object.");
        string Where(string field) => $"LoRA adapter '{request.Name}' (adapter_config.json '{field}')";
        if (cfg["peft_type"] is JsonValue type && type.GetValue<string>() is var peft && !string.Equals(peft, "LORA", StringComparison.OrdinalIgnoreCase))
            throw new ArgumentException($"{Where("peft_type")}: '{peft}' adapters are not served; only LORA.", nameof(request));
        if (cfg["use_dora"] is JsonValue dora && dora.GetValue<bool>()) throw new ArgumentException($"{Where("use_dora")}: DoRA adapters are not served.", nameof(request));
        if (cfg["fan_in_fan_out"] is JsonValue fan && fan.GetValue<bool>()) throw new ArgumentException($"{Where("fan_in_fan_out")}: transposed (Conv1D) weights are not served.", nameof(request));
        if (cfg["bias"] is JsonValue bias && bias.GetValue<string>() != "none") throw new ArgumentException($"{Where("bias")}: adapters that train biases are not served.", nameof(request));
        if (cfg["modules_to_save"] is JsonArray { Count: > 0 } saved)
            throw new ArgumentException($"{Where("modules_to_save")}: fully trained modules ({string.Join(", ", saved)}) are not served; only low-rank pairs.", nameof(request));
        foreach (var pattern in new[] { "rank_pattern", "alpha_pattern" })
            if (cfg[pattern] is JsonObject { Count: > 0 }) throw new ArgumentException($"{Where(pattern)}: per-module ranks or alphas are not served.", nameof(request));
        double alpha = cfg["lora_alpha"]?.GetValue<double>() ?? throw new ArgumentException($"{Where("lora_alpha")}: missing.", nameof(request));
        int r = cfg["r"]?.GetValue<int>() ?? throw new ArgumentException($"{Where("r")}: missing.", nameof(request));
        if (r < 1) throw new ArgumentException($"{Where("r")}: the rank must be at least 1, got {r}.", nameof(request));
        if (r > maxRank) throw new ArgumentException($"LoRA adapter '{request.Name}' has rank {r}, above the engine's MaxLoraRank {maxRank} (--max-lora-rank).", nameof(request));
        bool rs = cfg["use_rslora"] is JsonValue rsv && rsv.GetValue<bool>();
        double scale = rs ? alpha / Math.Sqrt(r) : alpha / r;

        long q = (long)config.NumAttentionHeads * config.HeadDim, kv = (long)config.NumKeyValueHeads * config.HeadDim;
        long hidden = config.HiddenSize, inter = config.IntermediateSize;
        // Each module: (projection, output offset inside it, output size, input size).
        var shapes = new Dictionary<string, (Projection P, long Offset, long Out, long In)>
        {
            ["q_proj"] = (Projection.Qkv, 0, q, hidden), ["k_proj"] = (Projection.Qkv, q, kv, hidden), ["v_proj"] = (Projection.Qkv, q + kv, kv, hidden),
            ["o_proj"] = (Projection.O, 0, hidden, q),
            ["gate_proj"] = (Projection.GateUp, 0, inter, hidden), ["up_proj"] = (Projection.GateUp, inter, inter, hidden),
            ["down_proj"] = (Projection.Down, 0, hidden, inter),
        };

        long[] widths = [q + 2 * kv, hidden, 2 * inter, hidden]; // each fused projection's output columns
        var pieces = new List<(long Offset, Tensor A, Tensor B)>[config.NumHiddenLayers, 4];
        for (int l = 0; l < config.NumHiddenLayers; l++)
            for (int p = 0; p < 4; p++) pieces[l, p] = [];
        using var file = SafetensorsFile.Open(weightsPath);
        var pairs = new Dictionary<(int Layer, string Module), (string? A, string? B)>();
        foreach (var key in file.Entries.Keys)
        {
            var m = KeyPattern().Match(key);
            if (!m.Success)
                throw new ArgumentException($"LoRA adapter '{request.Name}': weight '{key}' adapts a module this engine does not (only the attention and MLP projections {string.Join(", ", Modules)}).", nameof(request));
            int layer = int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
            if (layer >= config.NumHiddenLayers)
                throw new ArgumentException($"LoRA adapter '{request.Name}': weight '{key}' is for layer {layer}, but the model has {config.NumHiddenLayers} layers.", nameof(request));
            var id = (layer, m.Groups[3].Value);
            var (a, b) = pairs.GetValueOrDefault(id);
            pairs[id] = m.Groups[4].Value == "A" ? (key, b) : (a, key);
        }
        if (pairs.Count == 0) throw new ArgumentException($"LoRA adapter '{request.Name}': adapter_model.safetensors holds no LoRA weights.", nameof(request));

        try
        {
            foreach (var ((layer, module), (aKey, bKey)) in pairs.OrderBy(x => x.Key.Layer).ThenBy(x => Array.IndexOf(Modules, x.Key.Module)))
            {
                if (aKey is null || bKey is null)
                    throw new ArgumentException($"LoRA adapter '{request.Name}': layer {layer} {module} has lora_{(aKey is null ? "A" : "B")} missing.", nameof(request));
                var (projection, offset, outSize, inSize) = shapes[module];
                var aShape = file.Entries[aKey].Shape;
                var bShape = file.Entries[bKey].Shape;
                if (aShape.Length != 2 || aShape[0] != r || aShape[1] != inSize || bShape.Length != 2 || bShape[0] != outSize || bShape[1] != r)
                    throw new ArgumentException($"LoRA adapter '{request.Name}': layer {layer} {module} has lora_A [{string.Join(", ", aShape)}] and lora_B [{string.Join(", ", bShape)}]; " +
                                                $"this model (rank {r}) needs [{r}, {inSize}] and [{outSize}, {r}]: the adapter was trained for another model.", nameof(request));
                var a32 = file.Read(aKey, ScalarType.Float32, CPU);
                var b32 = file.Read(bKey, ScalarType.Float32, CPU);
                pieces[layer, (int)projection].Add((offset, a32, b32));
            }
            var fused = new Pair?[config.NumHiddenLayers][];
            for (int l = 0; l < config.NumHiddenLayers; l++)
            {
                fused[l] = new Pair?[4];
                for (int p = 0; p < 4; p++)
                {
                    var list = pieces[l, p];
                    if (list.Count == 0) continue;
                    // A stacked along the rank, B placed at each module's output columns and rank rows, scale folded in.
                    using var a = cat(list.Select(x => x.A).ToArray(), 0); // [R, in]
                    using var bt = zeros(list.Count * r, widths[p]); // [R, out]
                    for (int m = 0; m < list.Count; m++)
                        using (var block = bt.narrow(0, m * r, r).narrow(1, list[m].Offset, list[m].B.shape[0]))
                        using (var scaled = list[m].B.t() * scale)
                            block.copy_(scaled);
                    fused[l][p] = new Pair(a.t().to(dtype, device).contiguous(), bt.to(dtype, device).contiguous());
                }
            }
            return new LoraAdapter(request, r, fused);
        }
        finally
        {
            foreach (var list in pieces) foreach (var (_, a, b) in list) { a.Dispose(); b.Dispose(); }
        }
    }

    public void Dispose()
    {
        foreach (var layer in Pairs)
            foreach (var pair in layer)
            {
                pair?.AT.Dispose();
                pair?.BT.Dispose();
            }
    }
}
