using System.Text;
using LocalVllm.Engine.Kernels.Cpu;
using LocalVllm.Engine.Loading;
using LocalVllm.Engine.Models;
using static TorchSharp.torch;

namespace LocalVllm.Bench;

/// <summary>The GGUF tensor types the writer produces (ggml's type ids).</summary>
internal enum GgufType : uint { F32 = 0, F16 = 1, Q8_0 = 8, BF16 = 30 }

/// <summary>
/// Writes a Hugging Face Qwen3 (or Llama) checkpoint as a GGUF (v3) file for llama.cpp: the architecture keys, a
/// stand-in byte-free vocabulary of the model's size (ids are what both engines consume; no text is tokenized), and
/// the tensors under llama.cpp's names. Qwen models use rotate-half RoPE in both layouts, so q/k need no permutation.
/// Matrices are written in the requested type (F32, F16, BF16, or Q8_0: blocks of 32 weights, an f16 scale
/// <c>d = max|x| / 127</c> and 32 int8 <c>round(x / d)</c>, as ggml's reference quantizer does); 1-D tensors (norms)
/// stay F32, as llama.cpp's converter keeps them.
/// </summary>
internal static class GgufWriter
{
    private const uint Alignment = 32;

    public static void Write(string hfDir, string ggufPath, GgufType type = GgufType.F32)
    {
        var dir = ModelDirectory.Open(hfDir);
        var c = dir.Config;
        string arch = c.Architecture switch
        {
            "Qwen3ForCausalLM" => "qwen3",
            "LlamaForCausalLM" when c.RopeScaling.Type == "default" => "llama",
            _ => throw new NotSupportedException($"GGUF export supports Qwen3ForCausalLM and unscaled LlamaForCausalLM, not {c.Architecture}."),
        };
        using var weights = new WeightLoader(dir.WeightFiles);

        var names = new List<(string Gguf, string Hf)> { ("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight") };
        if (!c.TieWordEmbeddings) names.Add(("output.weight", "lm_head.weight"));
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string p = $"model.layers.{i}.", g = $"blk.{i}.";
            names.AddRange([
                (g + "attn_norm.weight", p + "input_layernorm.weight"), (g + "attn_q.weight", p + "self_attn.q_proj.weight"),
                (g + "attn_k.weight", p + "self_attn.k_proj.weight"), (g + "attn_v.weight", p + "self_attn.v_proj.weight"),
                (g + "attn_output.weight", p + "self_attn.o_proj.weight"), (g + "ffn_norm.weight", p + "post_attention_layernorm.weight"),
                (g + "ffn_gate.weight", p + "mlp.gate_proj.weight"), (g + "ffn_up.weight", p + "mlp.up_proj.weight"),
                (g + "ffn_down.weight", p + "mlp.down_proj.weight"),
            ]);
            if (c.QkNorm) names.AddRange([(g + "attn_q_norm.weight", p + "self_attn.q_norm.weight"), (g + "attn_k_norm.weight", p + "self_attn.k_norm.weight")]);
        }

        var tmp = ggufPath + ".tmp";
        using (var stream = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
        using (var w = new BinaryWriter(stream))
        {
            w.Write("GGUF"u8);
            w.Write(3u);
            w.Write((ulong)names.Count);
            var kv = new List<Action>();
            void Str(string key, string v) => kv.Add(() => { Key(w, key); w.Write(8u); GgufString(w, v); });
            void U32(string key, uint v) => kv.Add(() => { Key(w, key); w.Write(4u); w.Write(v); });
            void F32(string key, float v) => kv.Add(() => { Key(w, key); w.Write(6u); w.Write(v); });
            Str("general.architecture", arch);
            Str("general.name", "localvllm-bench-qwen3");
            U32("general.alignment", Alignment);
            U32("general.file_type", type switch { GgufType.F32 => 0u, GgufType.F16 => 1u, GgufType.Q8_0 => 7u, _ => 32u });
            U32(arch + ".block_count", (uint)c.NumHiddenLayers);
            U32(arch + ".context_length", (uint)c.MaxPositionEmbeddings);
            U32(arch + ".embedding_length", (uint)c.HiddenSize);
            U32(arch + ".feed_forward_length", (uint)c.IntermediateSize);
            U32(arch + ".attention.head_count", (uint)c.NumAttentionHeads);
            U32(arch + ".attention.head_count_kv", (uint)c.NumKeyValueHeads);
            U32(arch + ".attention.key_length", (uint)c.HeadDim);
            U32(arch + ".attention.value_length", (uint)c.HeadDim);
            F32(arch + ".rope.freq_base", (float)c.RopeTheta);
            U32(arch + ".rope.dimension_count", (uint)c.HeadDim);
            F32(arch + ".attention.layer_norm_rms_epsilon", (float)c.RmsNormEps);
            Str("tokenizer.ggml.model", "gpt2");
            Str("tokenizer.ggml.pre", "default");
            kv.Add(() =>
            {
                Key(w, "tokenizer.ggml.tokens");
                w.Write(9u); w.Write(8u); w.Write((ulong)c.VocabSize);
                for (int t = 0; t < c.VocabSize; t++) GgufString(w, $"<t{t}>"); // stand-in vocabulary: ids only
            });
            kv.Add(() =>
            {
                Key(w, "tokenizer.ggml.token_type");
                w.Write(9u); w.Write(5u); w.Write((ulong)c.VocabSize);
                for (int t = 0; t < c.VocabSize; t++) w.Write(1);
            });
            kv.Add(() => { Key(w, "tokenizer.ggml.merges"); w.Write(9u); w.Write(8u); w.Write(0UL); });
            int eos = dir.EosTokenIds.FirstOrDefault(c.VocabSize - 1);
            U32("tokenizer.ggml.eos_token_id", (uint)eos);
            U32("tokenizer.ggml.bos_token_id", (uint)eos);
            U32("tokenizer.ggml.padding_token_id", (uint)eos);
            w.Write((ulong)kv.Count);
            // The tensor count was written before the kv count: GGUF's header is magic, version, tensor count, kv count.
            foreach (var a in kv) a();

            ulong offset = 0;
            // llama.cpp's llama architecture rotates interleaved pairs; transformers rotates halves: permute q/k rows
            // as convert_hf_to_gguf does. Qwen models rotate halves in both, so they are written as they are.
            Tensor Load(string gguf, string hf)
            {
                var t = weights.Read(hf, ScalarType.Float32, CPU);
                if (arch != "llama" || !(gguf.EndsWith("attn_q.weight") || gguf.EndsWith("attn_k.weight"))) return t;
                long heads = gguf.EndsWith("attn_q.weight") ? c.NumAttentionHeads : c.NumKeyValueHeads;
                using (t) return t.reshape(heads, 2, t.shape[0] / heads / 2, t.shape[1]).transpose(1, 2).reshape(t.shape[0], t.shape[1]).contiguous();
            }
            var shapes = names.Select(n => Load(n.Gguf, n.Hf)).ToList();
            try
            {
                GgufType TypeOf(Tensor t) => t.dim() < 2 || (type == GgufType.Q8_0 && t.shape[^1] % 32 != 0) ? GgufType.F32 : type;
                for (int i = 0; i < names.Count; i++)
                {
                    GgufString(w, names[i].Gguf);
                    var shape = shapes[i].shape;
                    w.Write((uint)shape.Length);
                    foreach (var d in shape.Reverse()) w.Write((ulong)d); // ggml lists the fastest-moving dimension first
                    var t = TypeOf(shapes[i]);
                    w.Write((uint)t);
                    w.Write(offset);
                    offset += Align((ulong)ByteSize(shapes[i].NumberOfElements, t));
                }
                Pad(w);
                foreach (var t in shapes)
                {
                    using var contiguous = t.contiguous();
                    WriteData(w, contiguous, TypeOf(t));
                    Pad(w);
                }
            }
            finally
            {
                foreach (var t in shapes) t.Dispose();
            }
        }
        File.Move(tmp, ggufPath, overwrite: true);
    }

    private static long ByteSize(long elements, GgufType t) => t switch
    {
        GgufType.F32 => elements * 4,
        GgufType.F16 or GgufType.BF16 => elements * 2,
        GgufType.Q8_0 => elements / 32 * 34,
        _ => throw new NotSupportedException(t.ToString()),
    };

    private static void WriteData(BinaryWriter w, Tensor t, GgufType type)
    {
        switch (type)
        {
            case GgufType.F32:
                w.Write(t.bytes);
                break;
            case GgufType.F16:
            case GgufType.BF16:
            {
                using var converted = t.to(type == GgufType.F16 ? ScalarType.Float16 : ScalarType.BFloat16);
                w.Write(converted.bytes);
                break;
            }
            case GgufType.Q8_0:
            {
                // The engine's own quantizer (Q8_0's definition, tested against it): both engines get the same values.
                using var values = t.to(ScalarType.Float32).contiguous();
                var (q, scales) = Q8.Quantize(values.view(-1, Q8.Group));
                using (q)
                using (scales)
                {
                    var qs = q.data<sbyte>().ToArray();
                    var ds = scales.data<float>().ToArray();
                    var block = new byte[2 + Q8.Group];
                    for (int g = 0; g < ds.Length; g++)
                    {
                        BitConverter.TryWriteBytes(block.AsSpan(0, 2), (Half)ds[g]); // exact: the scales are float16 values
                        for (int j = 0; j < Q8.Group; j++) block[2 + j] = (byte)qs[g * Q8.Group + j];
                        w.Write(block);
                    }
                }
                break;
            }
        }
    }

    private static ulong Align(ulong n) => (n + Alignment - 1) / Alignment * Alignment;

    private static void Pad(BinaryWriter w)
    {
        long pos = w.BaseStream.Position;
        long pad = (long)Align((ulong)pos) - pos;
        for (long i = 0; i < pad; i++) w.Write((byte)0);
    }

    private static void Key(BinaryWriter w, string key) => GgufString(w, key);

    private static void GgufString(BinaryWriter w, string s)
    {
        var b = Encoding.UTF8.GetBytes(s);
        w.Write((ulong)b.Length);
        w.Write(b);
    }
}
