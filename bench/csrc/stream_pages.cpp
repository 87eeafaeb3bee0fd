// Scratch test: a weight stream (the C++ skinny product's one-row loop, and plain sums) over memory on 4 KB
// pages and on memory that asked for 2 MB transparent huge pages. Not part of the package.
//   g++ -O3 -march=native -fopenmp bench/csrc/stream_pages.cpp -o /tmp/stream_pages
//   OMP_NUM_THREADS=2 /tmp/stream_pages 3072 576 0   # 4 KB pages;  ... 3072 576 1: huge pages
// Output of the eighteenth session (two threads, nothing else running) in bench/results/stream_pages.txt.
#include <immintrin.h>
#include <omp.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <chrono>
#include <algorithm>
#include <sys/mman.h>
#include <cstring>
static inline float hsum(__m512 v){return _mm512_reduce_add_ps(v);}
template<int U, int PFD>
void rows(const float* x, int64_t K, const float* W, float* y, int64_t n0, int64_t n1){
  const int64_t step=16*U; const int64_t kmain=K-K%step;
  for(int64_t n=n0;n<n1;++n){
    const float* w=W+n*K; __m512 acc[U];
    for(int u=0;u<U;++u) acc[u]=_mm512_setzero_ps();
    for(int64_t k=0;k<kmain;k+=step){
      for(int u=0;u<U;++u){
        if constexpr(PFD>0) _mm_prefetch((const char*)(w+PFD*K+k+16*u), _MM_HINT_T0);
        acc[u]=_mm512_fmadd_ps(_mm512_loadu_ps(w+k+16*u), _mm512_loadu_ps(x+k+16*u), acc[u]);
      }
    }
    for(int64_t k=kmain;k<K;k+=16) acc[0]=_mm512_fmadd_ps(_mm512_loadu_ps(w+k), _mm512_loadu_ps(x+k), acc[0]);
    __m512 s=acc[0]; for(int u=1;u<U;++u) s=_mm512_add_ps(s,acc[u]); y[n]=hsum(s);
  }
}
// whole-range streaming: each thread one contiguous block of rows, no 16-row chunks
template<int U, int PFD>
void gemv(const float* x,const float* W,float* y,int64_t K,int64_t N, bool chunks){
  if(chunks){
    const int64_t items=(N+15)/16;
    #pragma omp parallel for schedule(static)
    for(int64_t it=0;it<items;++it){int64_t n0=it*16,n1=std::min(N,n0+16); rows<U,PFD>(x,K,W,y,n0,n1);}
  } else {
    #pragma omp parallel
    { int t=omp_get_thread_num(), T=omp_get_num_threads(); int64_t per=(N+T-1)/T; int64_t n0=t*per,n1=std::min(N,n0+per); if(n0<n1) rows<U,PFD>(x,K,W,y,n0,n1);}
  }
}
float sumall2(const float* W,int64_t n){
  float tot=0;
  #pragma omp parallel reduction(+:tot)
  { int t=omp_get_thread_num(), T=omp_get_num_threads(); int64_t per=(n/32+T-1)/T*32; int64_t a=t*per,b=std::min(n,a+per);
    __m256 s0=_mm256_setzero_ps(),s1=s0,s2=s0,s3=s0;
    for(int64_t i=a;i+32<=b;i+=32){s0=_mm256_add_ps(s0,_mm256_loadu_ps(W+i));s1=_mm256_add_ps(s1,_mm256_loadu_ps(W+i+8));s2=_mm256_add_ps(s2,_mm256_loadu_ps(W+i+16));s3=_mm256_add_ps(s3,_mm256_loadu_ps(W+i+24));}
    __m256 s=_mm256_add_ps(_mm256_add_ps(s0,s1),_mm256_add_ps(s2,s3)); float o[8]; _mm256_storeu_ps(o,s); for(int j=0;j<8;++j) tot+=o[j];}
  return tot;
}
float sumall(const float* W,int64_t n){
  float tot=0;
  #pragma omp parallel reduction(+:tot)
  { int t=omp_get_thread_num(), T=omp_get_num_threads(); int64_t per=(n/16+T-1)/T*16; int64_t a=t*per,b=std::min(n,a+per);
    __m512 s0=_mm512_setzero_ps(),s1=s0,s2=s0,s3=s0;
    for(int64_t i=a;i+64<=b;i+=64){s0=_mm512_add_ps(s0,_mm512_loadu_ps(W+i));s1=_mm512_add_ps(s1,_mm512_loadu_ps(W+i+16));s2=_mm512_add_ps(s2,_mm512_loadu_ps(W+i+32));s3=_mm512_add_ps(s3,_mm512_loadu_ps(W+i+48));}
    tot+=hsum(_mm512_add_ps(_mm512_add_ps(s0,s1),_mm512_add_ps(s2,s3)));}
  return tot;
}
int main(int argc,char**argv){
  int64_t N=atoi(argv[1]),K=atoi(argv[2]); int64_t copies=256LL*1024*1024/(N*K*4);
  bool huge=argc>3 && atoi(argv[3]);
  size_t bytes=((size_t)N*K*4+(2<<20)-1)/(2<<20)*(2<<20);
  std::vector<float*> Ws; for(int c=0;c<copies;++c){float* w=(float*)aligned_alloc(2<<20,bytes); if(huge) madvise(w,bytes,MADV_HUGEPAGE); for(int64_t i=0;i<N*K;++i) w[i]=(float)((i*7)%13)/13.f; Ws.push_back(w);}
  std::vector<float> x(K,0.5f), y(N);
  auto bench=[&](const char* name, auto fn){
    std::vector<double> r;
    for(int rep=0;rep<7;++rep){auto t=std::chrono::steady_clock::now(); for(auto w:Ws) fn(w); double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t).count()/copies; r.push_back(N*K*4/s/1e9);}
    std::sort(r.begin(),r.end()); printf("%-28s %.1f GB/s\n",name,r[3]);
  };
  volatile float sink=0;
  bench("sum", [&](float* w){ sink=sink+sumall(w,N*K);});
  bench("sum avx2", [&](float* w){ sink=sink+sumall2(w,N*K);});
  bench("rows U4 chunks16 (now)", [&](float* w){ gemv<4,0>(x.data(),w,y.data(),K,N,true);});
  bench("rows U4 contiguous", [&](float* w){ gemv<4,0>(x.data(),w,y.data(),K,N,false);});
  bench("rows U9 chunks16", [&](float* w){ gemv<9,0>(x.data(),w,y.data(),K,N,true);});
  bench("rows U4 pf+4rows", [&](float* w){ gemv<4,4>(x.data(),w,y.data(),K,N,true);});
  bench("rows U4 pf+8rows", [&](float* w){ gemv<4,8>(x.data(),w,y.data(),K,N,true);});
  bench("rows U4 pf+2rows", [&](float* w){ gemv<4,2>(x.data(),w,y.data(),K,N,true);});
  return 0;
}
