using System.IO.Hashing;
using System.Runtime.InteropServices;
using LocalVllm.Engine.Scheduling;

namespace LocalVllm.Engine.Cache;

/// <summary>
/// Hands out KV blocks, shares them by reference count, and keeps full blocks findable by a chained hash so that
/// identical prompt prefixes are computed once (automatic prefix caching). A block with reference count zero stays
/// in the cache until it is needed for something else; the least recently used goes first.
/// </summary>
public sealed class BlockManager
{
    private sealed class Block(int id)
    {
        public readonly int Id = id;
        public int RefCount;
        public ulong? Hash;
        public int[]? Tokens;
        public LinkedListNode<Block>? FreeNode;
    }

    private readonly Block[] _blocks;
    private readonly LinkedList<Block> _free = new(); // evict from the front
    private readonly Dictionary<ulong, Block> _cached = [];
    private readonly ulong _salt;

    /// <summary>Creates a pool of <paramref name="numBlocks"/> blocks of <paramref name="blockSize"/> tokens.</summary>
    public BlockManager(int numBlocks, int blockSize, bool enablePrefixCaching, ulong salt)
    {
        BlockSize = blockSize;
        EnablePrefixCaching = enablePrefixCaching;
        _salt = salt;
        _blocks = new Block[numBlocks];
        for (int i = 0; i < numBlocks; i++)
        {
            _blocks[i] = new Block(i);
            _blocks[i].FreeNode = _free.AddLast(_blocks[i]);
        }
    }

    public int BlockSize { get; }
    public bool EnablePrefixCaching { get; }
    public int NumBlocks => _blocks.Length;
    /// <summary>Blocks with reference count zero (free or cached-and-evictable).</summary>
    public int NumFreeBlocks => _free.Count;
    /// <summary>Blocks with reference count zero that still hold a cached prefix.</summary>
    public int NumCachedFreeBlocks => _free.Count(b => b.Hash is not null);
    /// <summary>Blocks owned by at least one sequence.</summary>
    public int NumUsedBlocks => _blocks.Length - _free.Count;

    /// <summary>Blocks needed to hold <paramref name="numTokens"/> tokens.</summary>
    public int BlocksFor(int numTokens) => (numTokens + BlockSize - 1) / BlockSize;

    /// <summary>
    /// The longest run of <paramref name="seq"/>'s leading full blocks found in the cache, confirmed token by token,
    /// leaving at least the last known token to compute. Nothing is allocated.
    /// </summary>
    public IReadOnlyList<int> FindCachedPrefix(Sequence seq)
    {
        if (!EnablePrefixCaching) return [];
        ExtendHashes(seq);
        int maxBlocks = (seq.NumTokens - 1) / BlockSize;
        var hits = new List<int>();
        for (int i = 0; i < maxBlocks && i < seq.BlockHashes.Count; i++)
        {
            if (!_cached.TryGetValue(seq.BlockHashes[i], out var block)) break;
            if (!TokensEqual(block.Tokens!, seq, i)) break;
            hits.Add(block.Id);
        }
        return hits;
    }

    /// <summary>Whether <paramref name="seq"/> (holding <paramref name="hits"/> first) can grow to <paramref name="numTokens"/> tokens.</summary>
    public bool CanAllocate(Sequence seq, IReadOnlyList<int> hits, int numTokens)
    {
        int needed = BlocksFor(numTokens) - seq.BlockTable.Count - hits.Count;
        int hitsFromFree = 0;
        foreach (var id in hits) if (_blocks[id].RefCount == 0) hitsFromFree++;
        return needed <= _free.Count - hitsFromFree;
    }

    /// <summary>Takes <paramref name="hits"/> (shared) and fresh blocks so that <paramref name="seq"/> holds <paramref name="numTokens"/> tokens.</summary>
    public void Allocate(Sequence seq, IReadOnlyList<int> hits, int numTokens)
    {
        if (!CanAllocate(seq, hits, numTokens))
            throw new InvalidOperationException($"Not enough free KV blocks for sequence {seq.RequestId}.");
        foreach (var id in hits)
        {
            var b = _blocks[id];
            if (b.RefCount++ == 0) RemoveFromFree(b);
            seq.BlockTable.Add(id);
        }
        if (hits.Count > 0) seq.NumRegisteredBlocks = seq.BlockTable.Count;
        while (seq.BlockTable.Count < BlocksFor(numTokens))
        {
            var b = _free.First!.Value;
            RemoveFromFree(b);
            if (b.Hash is ulong h) _cached.Remove(h);
            b.Hash = null;
            b.Tokens = null;
            b.RefCount = 1;
            seq.BlockTable.Add(b.Id);
        }
    }

    /// <summary>Registers <paramref name="seq"/>'s newly computed full blocks in the prefix cache.</summary>
    public void CacheFullBlocks(Sequence seq)
    {
        if (!EnablePrefixCaching) return;
        int full = Math.Min(seq.NumComputedTokens / BlockSize, seq.BlockTable.Count);
        if (full <= seq.NumRegisteredBlocks) return;
        ExtendHashes(seq);
        for (int i = seq.NumRegisteredBlocks; i < full; i++)
        {
            var b = _blocks[seq.BlockTable[i]];
            if (b.Hash is not null) continue;
            ulong h = seq.BlockHashes[i];
            if (_cached.ContainsKey(h)) continue; // computed twice in one step: keep the first copy
            b.Hash = h;
            b.Tokens = CollectionsMarshal.AsSpan(seq.TokenList).Slice(i * BlockSize, BlockSize).ToArray();
            _cached[h] = b;
        }
        seq.NumRegisteredBlocks = full;
    }

    /// <summary>Releases <paramref name="seq"/>'s blocks; cached ones stay findable, tail blocks are evicted first.</summary>
    public void Free(Sequence seq)
    {
        for (int i = seq.BlockTable.Count - 1; i >= 0; i--)
        {
            var b = _blocks[seq.BlockTable[i]];
            if (--b.RefCount > 0) continue;
            if (b.RefCount < 0) throw new InvalidOperationException($"Block {b.Id} freed twice.");
            b.FreeNode = b.Hash is null ? _free.AddFirst(b) : _free.AddLast(b);
        }
        seq.BlockTable.Clear();
        seq.NumRegisteredBlocks = 0;
    }

    /// <summary>Throws if the pool's bookkeeping is inconsistent; used by tests after every request.</summary>
    public void CheckInvariants(bool expectAllFree)
    {
        int free = 0;
        foreach (var b in _blocks)
        {
            if (b.RefCount < 0) throw new InvalidOperationException($"Block {b.Id} has reference count {b.RefCount}.");
            if ((b.RefCount == 0) != (b.FreeNode is not null))
                throw new InvalidOperationException($"Block {b.Id} (ref {b.RefCount}) is {(b.FreeNode is null ? "not " : "")}in the free list.");
            if (b.RefCount == 0) free++;
            if (expectAllFree && b.RefCount != 0) throw new InvalidOperationException($"Block {b.Id} leaked with reference count {b.RefCount}.");
            if (b.Hash is ulong h && (!_cached.TryGetValue(h, out var c) || c != b))
                throw new InvalidOperationException($"Block {b.Id} has a hash that the cache does not map to it.");
        }
        if (free != _free.Count) throw new InvalidOperationException($"Free list holds {_free.Count} blocks but {free} have reference count 0.");
        if (NumUsedBlocks + NumFreeBlocks != NumBlocks) throw new InvalidOperationException("used + free != total.");
    }

    private void RemoveFromFree(Block b)
    {
        _free.Remove(b.FreeNode!);
        b.FreeNode = null;
    }

    private void ExtendHashes(Sequence seq)
    {
        var tokens = seq.TokenList;
        int full = seq.NumTokens / BlockSize;
        Span<byte> parent = stackalloc byte[8];
        for (int i = seq.BlockHashes.Count; i < full; i++)
        {
            ulong parentHash = i == 0 ? _salt : seq.BlockHashes[i - 1];
            var hasher = new XxHash64(unchecked((long)_salt));
            BitConverter.TryWriteBytes(parent, parentHash);
            hasher.Append(parent);
            hasher.Append(MemoryMarshal.AsBytes(CollectionsMarshal.AsSpan(tokens).Slice(i * BlockSize, BlockSize)));
            seq.BlockHashes.Add(hasher.GetCurrentHashAsUInt64());
        }
    }

    private bool TokensEqual(int[] cached, Sequence seq, int blockIndex)
    {
        var tokens = CollectionsMarshal.AsSpan(seq.TokenList).Slice(blockIndex * BlockSize, BlockSize);
        return tokens.SequenceEqual(cached);
    }
}
