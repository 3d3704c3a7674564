using System.Text;

namespace LocalVllm.Engine.Text.Tokenization;

/// <summary>
/// SentencePiece's BPE encoding, read straight from <c>tokenizer.model</c>: spaces become ▁ (with a dummy prefix),
/// then adjacent symbols merge, highest piece score first and leftmost on ties, until no merge applies; symbols
/// outside the vocabulary fall back to byte pieces. Written here because Microsoft.ML.Tokenizers breaks score ties
/// differently and mis-encodes runs of one repeated character (e.g. "!!!!!!").
/// </summary>
internal sealed class SentencePieceBpe
{
    private readonly Dictionary<string, (int Id, float Score)> _pieces = new(StringComparer.Ordinal);
    private readonly int[] _byteIds = Enumerable.Repeat(-1, 256).ToArray();
    private readonly int _unkId;

    public SentencePieceBpe(byte[] model, bool addDummyPrefix)
    {
        AddDummyPrefix = addDummyPrefix;
        var reader = new ProtoReader(model);
        int id = 0;
        while (reader.Next(out int field, out int wire))
        {
            if (field == 1 && wire == 2)
            {
                var piece = new ProtoReader(reader.Bytes());
                string text = ""; float score = 0; int type = 1;
                while (piece.Next(out int f, out int w))
                {
                    if (f == 1 && w == 2) text = Encoding.UTF8.GetString(piece.Bytes());
                    else if (f == 2 && w == 5) score = piece.Fixed32();
                    else if (f == 3 && w == 0) type = (int)piece.Varint();
                    else piece.Skip(w);
                }
                if (type == 6 && text.Length == 6 && text.StartsWith("<0x", StringComparison.Ordinal)) _byteIds[Convert.ToByte(text[3..5], 16)] = id;
                else if (type == 2) _unkId = id;
                else if (type is 1 or 4) _pieces.TryAdd(text, (id, score)); // NORMAL or USER_DEFINED
                id++;
            }
            else reader.Skip(wire);
        }
    }

    public bool AddDummyPrefix { get; }

    public void Encode(string text, List<int> output)
    {
        if (text.Length == 0) return;
        var normalized = (AddDummyPrefix ? "\u2581" : "") + text.Replace(' ', '\u2581');
        // Symbols as a doubly linked list over text elements (surrogate pairs stay together).
        var symbols = new List<string>();
        for (int i = 0; i < normalized.Length; i++)
            symbols.Add(char.IsHighSurrogate(normalized[i]) && i + 1 < normalized.Length ? normalized.Substring(i++, 2) : normalized[i].ToString());
        int n = symbols.Count;
        var prev = new int[n]; var next = new int[n]; var alive = new bool[n];
        for (int i = 0; i < n; i++) { prev[i] = i - 1; next[i] = i + 1 < n ? i + 1 : -1; alive[i] = true; }

        var queue = new PriorityQueue<(int Left, int Right, string Merged), (float, int)>(Comparer<(float, int)>.Create((a, b) =>
        {
            int c = b.Item1.CompareTo(a.Item1); // higher score first
            return c != 0 ? c : a.Item2.CompareTo(b.Item2); // then leftmost
        }));
        void Consider(int left)
        {
            if (left < 0) return;
            int right = next[left];
            if (right < 0) return;
            var merged = symbols[left] + symbols[right];
            if (_pieces.TryGetValue(merged, out var p)) queue.Enqueue((left, right, merged), (p.Score, left));
        }
        for (int i = 0; i < n - 1; i++) Consider(i);
        while (queue.TryDequeue(out var m, out _))
        {
            if (!alive[m.Left] || !alive[m.Right] || next[m.Left] != m.Right || symbols[m.Left] + symbols[m.Right] != m.Merged) continue;
            symbols[m.Left] = m.Merged;
            alive[m.Right] = false;
            next[m.Left] = next[m.Right];
            if (next[m.Right] >= 0) prev[next[m.Right]] = m.Left;
            Consider(prev[m.Left]);
            Consider(m.Left);
        }
        for (int i = 0; i >= 0 && i < n; i = next[i])
        {
            if (_pieces.TryGetValue(symbols[i], out var p)) { output.Add(p.Id); continue; }
            foreach (var b in Encoding.UTF8.GetBytes(symbols[i]))
                output.Add(_byteIds[b] >= 0 ? _byteIds[b] : _unkId);
        }
    }

    /// <summary>Just enough protobuf to read a SentencePiece ModelProto.</summary>
    private sealed class ProtoReader(byte[] data)
    {
        private int _pos;

        public bool Next(out int field, out int wire)
        {
            field = wire = 0;
            if (_pos >= data.Length) return false;
            ulong key = Varint();
            field = (int)(key >> 3);
            wire = (int)(key & 7);
            return true;
        }

        public ulong Varint()
        {
            ulong result = 0;
            for (int shift = 0; ; shift += 7)
            {
                byte b = data[_pos++];
                result |= (ulong)(b & 0x7f) << shift;
                if ((b & 0x80) == 0) return result;
            }
        }

        public byte[] Bytes()
        {
            int len = (int)Varint();
            var r = data.AsSpan(_pos, len).ToArray();
            _pos += len;
            return r;
        }

        public float Fixed32()
        {
            float f = BitConverter.ToSingle(data, _pos);
            _pos += 4;
            return f;
        }

        public void Skip(int wire)
        {
            switch (wire)
            {
                case 0: Varint(); break;
                case 1: _pos += 8; break;
                case 2: { int len = (int)Varint(); _pos += len; break; }
                case 5: _pos += 4; break;
                default: throw new InvalidDataException($"tokenizer.model: unsupported protobuf wire type {wire}.");
            }
        }
    }
}
