using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Models;

/// <summary>The shape of a generated random-weight model.</summary>
public sealed record RandomModelSpec
{
    public string Architecture { get; init; } = "Qwen3ForCausalLM";
    public int VocabSize { get; init; } = 512;
    public int HiddenSize { get; init; } = 64;
    public int IntermediateSize { get; init; } = 128;
    public int NumHiddenLayers { get; init; } = 2;
    public int NumAttentionHeads { get; init; } = 4;
    public int NumKeyValueHeads { get; init; } = 2;
    public int HeadDim { get; init; } = 16;
    public int MaxPositionEmbeddings { get; init; } = 4096;
    public double RopeTheta { get; init; } = 1_000_000;
    public bool TieWordEmbeddings { get; init; } = true;
    public int EosTokenId { get; init; } = 2;

    /// <summary>Qwen3-0.6B's exact shape (596M parameters).</summary>
    public static RandomModelSpec Qwen3_0_6B => new()
    {
        VocabSize = 151936, HiddenSize = 1024, IntermediateSize = 3072, NumHiddenLayers = 28,
        NumAttentionHeads = 16, NumKeyValueHeads = 8, HeadDim = 128, MaxPositionEmbeddings = 40960, EosTokenId = 151645,
    };
}

/// <summary>
/// Writes a model directory with seeded random weights (projections ~ N(0, 1/fan_in), norms around 1): the demo
/// model of the sample and the realistic-size model of the benchmarks, made without a download.
/// </summary>
public static class RandomModel
{
    /// <summary>
    /// Writes a byte-level BPE tokenizer with no merges (one token per byte) plus ChatML's special tokens and a ChatML
    /// chat template, so that a generated model can be driven through the chat client. Returns the vocabulary size used.
    /// </summary>
    public static int WriteByteTokenizer(string dir)
    {
        System.IO.Directory.CreateDirectory(dir);
        var vocab = new JsonObject();
        for (int b = 0; b < 256; b++) vocab[Tokenization.ByteLevelAlphabet.Char((byte)b).ToString()] = b;
        string[] special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        var added = new JsonArray();
        for (int i = 0; i < special.Length; i++)
            added.Add(new JsonObject { ["id"] = 256 + i, ["content"] = special[i], ["special"] = true });
        var tokenizer = new JsonObject
        {
            ["added_tokens"] = added,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel" },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel" },
            ["model"] = new JsonObject { ["type"] = "BPE", ["vocab"] = vocab, ["merges"] = new JsonArray() },
        };
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), tokenizer.ToJsonString());
        const string template =
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}" +
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), new JsonObject
        {
            ["eos_token"] = "<|im_end|>", ["pad_token"] = "<|endoftext|>", ["add_bos_token"] = false, ["chat_template"] = template,
        }.ToJsonString());
        return 256 + special.Length;
    }

    /// <summary>Creates <paramref name="dir"/> with config.json, generation_config.json and model.safetensors.</summary>
    public static void Write(string dir, RandomModelSpec spec, long seed)
    {
        System.IO.Directory.CreateDirectory(dir);
        var config = new JsonObject
        {
            ["architectures"] = new JsonArray(spec.Architecture),
            ["vocab_size"] = spec.VocabSize,
            ["hidden_size"] = spec.HiddenSize,
            ["intermediate_size"] = spec.IntermediateSize,
            ["num_hidden_layers"] = spec.NumHiddenLayers,
            ["num_attention_heads"] = spec.NumAttentionHeads,
            ["num_key_value_heads"] = spec.NumKeyValueHeads,
            ["head_dim"] = spec.HeadDim,
            ["max_position_embeddings"] = spec.MaxPositionEmbeddings,
            ["rms_norm_eps"] = 1e-6,
            ["rope_theta"] = spec.RopeTheta,
            ["rope_scaling"] = null,
            ["tie_word_embeddings"] = spec.TieWordEmbeddings,
            ["torch_dtype"] = "float32",
            ["eos_token_id"] = spec.EosTokenId,
        };
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        File.WriteAllText(Path.Combine(dir, "generation_config.json"), new JsonObject { ["eos_token_id"] = spec.EosTokenId }.ToJsonString());

        var c = ModelConfig.Parse(config, dir);
        var generator = new Generator((ulong)seed);
        var tensors = new Dictionary<string, Tensor>();
        try
        {
            foreach (var (key, shape) in CausalLm.ExpectedTensors(c))
            {
                if (key == "lm_head.weight" && c.TieWordEmbeddings) continue;
                tensors[key] = key.EndsWith("norm.weight", StringComparison.Ordinal)
                    ? 1 + 0.1f * randn(shape, generator: generator)
                    : key.EndsWith(".bias", StringComparison.Ordinal)
                        ? 0.01f * randn(shape, generator: generator)
                        : randn(shape, generator: generator) / MathF.Sqrt(shape[^1]);
            }
            SafetensorsWriter.Write(Path.Combine(dir, "model.safetensors"), tensors);
        }
        finally
        {
            foreach (var t in tensors.Values) t.Dispose();
        }
    }
}
